"""Jobs: the job spec, run state on disk, the embedded runner and the Celery submitter; the CLI lives here too."""
