"""The run browser (``synthtrial view``): a small web app over a run directory, served from 127.0.0.1 or
written as a static site. :mod:`synthtrial.view.data` reads the run and lists every URL it may serve;
:mod:`synthtrial.view.server` serves or writes them; ``assets/`` holds the plain HTML/CSS/JavaScript pages
(no build step, nothing fetched from elsewhere)."""
