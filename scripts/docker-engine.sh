#!/usr/bin/env bash
# Start a Docker engine that never touches the Docker bridge (172.17.x): containers of the
# harness use host networking on 127.0.0.1 only.
#   scripts/docker-engine.sh start   start dockerd unless one answers; prints its pid file
#   scripts/docker-engine.sh stop    stop the dockerd this script started
set -euo pipefail
pidfile=/run/pacs-harness-dockerd.pid
case "${1:-}" in
  start)
    if docker info >/dev/null 2>&1; then
      echo "docker engine already running"
      exit 0
    fi
    command -v dockerd >/dev/null || { echo "dockerd not installed (./setup.sh --with-docker)" >&2; exit 3; }
    dockerd --bridge=none --iptables=false --ip-masq=false >/var/log/pacs-harness-dockerd.log 2>&1 &
    echo $! > "$pidfile"
    for _ in $(seq 1 60); do
      docker info >/dev/null 2>&1 && { echo "docker engine started (pid $(cat "$pidfile"))"; exit 0; }
      sleep 1
    done
    echo "dockerd did not answer within 60 s; see /var/log/pacs-harness-dockerd.log" >&2
    exit 3
    ;;
  stop)
    if [ -f "$pidfile" ]; then
      kill "$(cat "$pidfile")" 2>/dev/null || true
      rm -f "$pidfile"
    fi
    ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
