"""Trial statuses, the queue's timing and the metric columns: plain constants, free of the database libraries, so the
command line's defaults read them without loading SQLAlchemy."""

STATUSES = ("pending", "running", "done", "failed", "diverged", "interrupted", "pruned")
FINAL = ("done", "failed", "diverged", "pruned")  # statuses a trial keeps until --rerun
HEARTBEAT_S = 30.0  # how often a running trial's heartbeat is written
STALE_AFTER_S = 600.0  # a running trial on another host with no heartbeat for this long is claimed again
# a metric -> its ResultRow column, the validation top-1 (what adaptive seeds decide and a search optimizes)
METRIC_COLUMNS = {"linear": "linear_top1", "finetune": "finetune_top1"}
