"""The shared progress bar: drawn on stderr with its status, silent when disabled, stdout left alone."""

from synthtrial.progress import progress_bar


def test_bar_goes_to_stderr_with_status(capsys):
    with progress_bar("training", 4, unit="steps") as update:
        for step in range(1, 5):
            update(step, f"loss {1 / step:.2f}")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "training" in captured.err and "4/4" in captured.err and "loss 0.25" in captured.err


def test_disabled_bar_is_silent(capsys):
    with progress_bar("rendering", 3, enabled=False) as update:
        update(3)
    assert capsys.readouterr() == ("", "")
