#!/bin/sh
# The image's entrypoint: `mnistq-entrypoint COMMAND [ARGS]` runs `mnistq COMMAND [ARGS]` (exec:
# mnistq becomes PID 1 and gets the signals) once the folders that COMMAND writes or reads are
# usable by the user the container runs as. Until then it says in one line what to run on the
# host; a service (worker, watch, run) then marks the container unhealthy (the image's
# HEALTHCHECK runs `mnistq-entrypoint --health`) and waits, rechecking every 5 s, rather than
# crash and restart in a loop; a one-off command (train) exits 2.
set -eu

BLOCKED=${MNISTQ_BLOCKED_FILE:-/tmp/mnistq-blocked}

if [ "${1:-}" = "--health" ]; then
    if [ -e "$BLOCKED" ]; then
        cat "$BLOCKED"
        exit 1
    fi
    exit 0
fi

cmd=${1:-worker}
inbox=${MNISTQ_INBOX:-inbox}
csv=${MNISTQ_CSV:-results.csv}
roots=${MNISTQ_ALLOWED_ROOTS:-}
out=
data=
keep=
prev=
for arg in "$@"; do
    case $prev in
        --inbox) inbox=$arg ;;
        --csv) csv=$arg ;;
        --out) out=$arg ;;
        --data-dir) data=$arg ;;
    esac
    case $arg in
        --inbox=*) inbox=${arg#*=} ;;
        --csv=*) csv=${arg#*=} ;;
        --out=*) out=${arg#*=} ;;
        --data-dir=*) data=${arg#*=} ;;
        --keep) keep=1 ;;
    esac
    prev=$arg
done

me="$(id -u):$(id -g)"

# The folder itself, or the nearest one above it that exists (mnistq makes the rest).
existing() {
    d=$1
    while [ ! -e "$d" ] && [ "$d" != / ] && [ "$d" != . ]; do
        d=$(dirname "$d")
    done
    printf '%s' "$d"
}

# Each check prints "VERB FOLDER" for a folder this user cannot use; nothing when it can.
writable() {
    d=$(existing "$1")
    [ -d "$d" ] && [ -w "$d" ] && [ -x "$d" ] || echo "write $1"
}

readable() {
    d=$(existing "$1")
    [ -r "$d" ] && [ -x "$d" ] || echo "read $1"
}

# Prints one line per problem; nothing when the command can start.
problems() {
    case $cmd in
        watch | run)
            if [ -n "$keep" ]; then readable "$inbox"; else writable "$inbox"; fi
            writable "$(dirname "$csv")"
            if [ -e "$csv" ] && [ ! -w "$csv" ]; then echo "write $csv"; fi
            ;;
        worker)
            if [ -z "$roots" ]; then roots=$inbox; fi
            old_ifs=$IFS
            IFS=:
            for root in $roots; do readable "$root"; done
            IFS=$old_ifs
            ;;
        train)
            if [ -n "$out" ]; then writable "$(dirname "$out")"; fi
            # MNIST is downloaded into the data folder unless its files are there (in
            # DIR/MNIST/raw, DIR/raw or DIR, each file maybe .gz).
            if [ -n "$data" ]; then
                have=
                for raw in "$data/MNIST/raw" "$data/raw" "$data"; do
                    for f in "$raw/t10k-labels-idx1-ubyte" "$raw/t10k-labels-idx1-ubyte.gz"; do
                        if [ -e "$f" ]; then have=1; fi
                    done
                done
                if [ -z "$have" ]; then writable "$data"; fi
            fi
            ;;
    esac
    return 0
}

# One line for all of them: what cannot be used, by whom, and what to run on the host.
complaint() {
    what=$(printf '%s\n' "$1" | sed 's/ .*//' | sort -u | tr '\n' '/' | sed 's,/$,,')
    folders=$(printf '%s\n' "$1" | sed 's/^[a-z]* //' | tr '\n' ' ' | sed 's/ $//')
    first=$(existing "$(printf '%s\n' "$1" | sed -n '1s/^[a-z]* //p')")
    owner=$(stat -c %u:%g "$first" 2>/dev/null || echo '?')
    printf 'mnistq: cannot %s %s (owner %s; this container runs as %s): on the host, give them to %s (docker compose: sudo chown -R %s data) or set MNISTQ_UID/MNISTQ_GID in .env to their owner, then %s\n' \
        "$what" "$folders" "$owner" "$me" "$me" "$me" "$2"
}

trap 'rm -f "$BLOCKED" "$BLOCKED.part"; exit 143' TERM
trap 'rm -f "$BLOCKED" "$BLOCKED.part"; exit 130' INT
rm -f "$BLOCKED" "$BLOCKED.part"
case $cmd in
    worker | watch | run) ;;
    *)
        found=$(problems)
        if [ -n "$found" ]; then
            complaint "$found" "run it again" >&2
            exit 2
        fi
        exec mnistq "$@"
        ;;
esac
said=
while found=$(problems) && [ -n "$found" ]; do
    if [ "$found" != "$said" ]; then
        # Whole or not at all: the health check may read it at any moment.
        complaint "$found" "docker compose up -d; waiting" >"$BLOCKED.part"
        mv -f "$BLOCKED.part" "$BLOCKED"
        cat "$BLOCKED" >&2
        said=$found
    fi
    sleep 5 &
    wait $! || true
done
if [ -n "$said" ]; then
    rm -f "$BLOCKED"
    echo "mnistq: the folders are usable now; starting" >&2
fi
exec mnistq "$@"
