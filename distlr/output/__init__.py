"""What rank 0 shows and writes: the progress (``progress``), the summary (``summary``), result
files and output directories (``files``), the plots (``plot``) and the trackers (``trackers``)."""
