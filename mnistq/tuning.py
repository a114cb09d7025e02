"""The tuning constants of the loops, in one place: timings and bounds that no setting exposes
(settings are in mnistq/settings.py). Each module imports the ones it uses; a test may still
patch a module's own name for it."""

# mnistq/evidence.py
#: lost work is work that two looks at least this far apart both missed
CONFIRM_S = 5.0
#: seconds between a Lookout's looks (LostWork rate-limits its own probes as well)
LOOK_EVERY_S = 0.5

# producer/dispatch.py
#: files in flight at most: bounds the producer's memory and the queue, whatever the inbox holds
MAX_IN_FLIGHT = 4096
#: at most one line per this many seconds about sends that fail (a broker that is down)
SEND_WARN_EVERY_S = 30.0
#: The work a rate is shown for: less is a few files' latency, not a throughput.
MIN_TIMED_S = 1.0

# producer/finish.py
#: seconds between tries while the disk refuses the rows
RETRY_S = 2.0

# producer/watcher.py (WatchOptions' defaults)
#: candidates, ready files and waiting hints held, each (at least 4 messages): past that
#: the inbox keeps the files and a pass over it finds them. A burst of 10,000 fits without
#: one; a path held costs ~200 bytes, so ~1 MB each.
HOLD = 4096
#: between passes over the whole inbox (events are hints; a pass finds what they missed)
RESCAN_S = 30.0
#: on stop, how long to wait for the rows of files in flight
GRACE_S = 60.0
#: How long the loop waits for hints while candidates settle (their checks are due in time);
#: hints, answers and stops wake it at once, so this bounds no file's delay.
EVENT_WAIT_S = 0.02
#: ... and while nothing settles: only the periodic looks (lost work, retries, rescans, the
#: broker) wait on it, and they run every 0.5 s or less often.
IDLE_WAIT_S = 0.1
#: How long the collector blocks on the reply list per call: bounds how late it sees a stop.
COLLECT_WAIT_S = 0.2
#: Between progress log lines.
LOG_EVERY_S = 10.0
#: While the broker is away, how often the loop asks whether it is back.
PING_EVERY_S = 1.0
#: How often the loop looks whether the inbox is still the folder it took (one stat).
HOME_LOOK_S = 0.1
#: While some folder or file cannot be read (a permission), how often the inbox is read again:
#: its files are taken as soon as the permission is back.
DENIED_RESCAN_S = 5.0

# api/job.py
#: Results are late when nothing was sent or answered for this long: then look for a worker.
LATE_S = 10.0
#: Between looks for a worker while results stay late.
WORKER_CHECK_S = 60.0

# worker/cli.py
#: seconds `mnistq status` gives the broker to answer before it says it cannot reach it
BROKER_TIMEOUT_S = 3.0

# worker/broker.py
#: seconds between reconnect attempts, at most (1, 2, 3, ... then every RETRY_MAX_S)
RETRY_MAX_S = 5

# worker/outage.py and mnistq/broker.py (the outages' reminders)
#: at most one "still unreachable" line per this many seconds while a server stays away
REMIND_EVERY_S = 30.0

# worker/reply.py
#: how long a task thread keeps trying to deliver a reply while the results Redis is away (or
#: full): longer than a Redis restart takes; the message stays this worker's meanwhile (its
#: delivery time is renewed, worker/redis_transport.py); after that the producer resends
REPLY_RETRY_S = 20.0

# app/supervisor.py
#: A worker that lived shorter than this before exiting is restarted after a growing delay.
QUICK_EXIT_S = 10.0
MAX_RESTART_DELAY_S = 30.0

# app/run.py
#: After a fatal worker failure the watcher cannot finish its rows; it gets this long to notice.
FAILURE_GRACE_S = 10.0
