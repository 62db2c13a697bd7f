"""The job's ranks: every collective distlr issues (``collectives``), the process group it joins
or makes (``session``) and what a signal does mid-run (``signals``)."""
