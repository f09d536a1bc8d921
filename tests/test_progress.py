"""The shared progress bar: drawn on stderr with its status on a terminal, silent when disabled or piped,
stdout left alone."""

from synthtrial.util.progress import progress_bar


def test_bar_goes_to_stderr_with_status(capsys, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich: treat the captured stderr as a terminal
    with progress_bar("training", 4, unit="steps") as update:
        for step in range(1, 5):
            update(step, f"loss {1 / step:.2f}")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "training" in captured.err and "4/4" in captured.err and "loss 0.25" in captured.err


def test_total_can_be_given_late(capsys, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")
    with progress_bar("grading", 1) as update:
        update(6, total=12)
    assert "6/12" in capsys.readouterr().err


def test_piped_or_disabled_bar_is_silent(capsys, monkeypatch):
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    with progress_bar("rendering", 3) as update:  # stderr is not a terminal under capsys
        update(3)
    with progress_bar("rendering", 3, enabled=False) as update:
        update(3)
    assert capsys.readouterr() == ("", "")
