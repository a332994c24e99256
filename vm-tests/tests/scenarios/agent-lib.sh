# Guest helpers for scenarios with sanvol-agent (prepended by tests/common/mod.rs).
export SANVOL_AGENT_SOCKET=/run/sanvol/agent.sock
AGENT_LOG=/tmp/agent.log

# start_agent [EXTRA ARGS...]: runs the agent in the background (PID in $AGENT_PID) and waits for it.
# The pool records devices as nbd://127.0.0.1:PORT; the guest reaches them at $SANVOL_HOST, unless the
# scenario maps each device itself (DEVICE_URIS: --device-uri OLD=NEW arguments).
start_agent() {
    launch_agent "$@"
    sanvol-agent wait-ready --timeout-secs 60 || { tail -n 30 "$AGENT_LOG"; fail "the agent did not become ready"; }
}

# launch_agent [EXTRA ARGS...]: start_agent without waiting for it.
launch_agent() {
    mkdir -p /run/sanvol
    devices="--device-host-alias 127.0.0.1=$SANVOL_HOST"
    [ -z "${DEVICE_URIS:-}" ] || devices=$DEVICE_URIS
    sanvol-agent run --mds "$SANVOL_HOST:$MDS_PORT" --key /etc/sanvol/agent.key \
        --server-key /etc/sanvol/mds.key.pub --name guest --export-dir /run/sanvol/exports \
        $devices "$@" >>"$AGENT_LOG" 2>&1 &
    AGENT_PID=$!
}

# seconds_of_day TIME: HH:MM:SS.FRACTION (anywhere in the argument) as seconds since midnight.
seconds_of_day() {
    echo "$1" | sed 's/.*\([0-9][0-9]:[0-9][0-9]:[0-9][0-9]\.[0-9]*\).*/\1/' |
        awk -F: '{ printf "%.6f", $1 * 3600 + $2 * 60 + $3 }'
}

agent_log() {
    echo "---- agent log (last 40 lines) ----"
    tail -n 40 "$AGENT_LOG" || true
}
