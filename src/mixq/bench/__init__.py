"""The survey's comparison as one command (``mixq bench``) and self-contained reports.

:mod:`.settings` holds what a run is (methods, budgets, :class:`~.settings.BenchConfig`, file names);
:mod:`.runner` runs every method × budget on one model under one protocol (resumable, one
measurement for all budgets); :mod:`.report` collects the rows and builds the report; :mod:`.html` turns
results into a Markdown file and a single HTML file with its figures embedded.
"""
