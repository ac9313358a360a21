"""Trial statuses and the queue's timing: plain constants, free of the database libraries, so the command line's
defaults and the study rounds read them without loading SQLAlchemy."""

STATUSES = ("pending", "running", "done", "failed", "diverged", "interrupted", "pruned")
FINAL = ("done", "failed", "diverged", "pruned")  # statuses a trial keeps until --rerun
HEARTBEAT_S = 30.0  # how often a running trial's heartbeat is written
STALE_AFTER_S = 600.0  # a running trial on another host with no heartbeat for this long is claimed again
