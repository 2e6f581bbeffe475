#!/usr/bin/env bash
# Like the original QuillGPT's run.sh: ./run.sh start-dev | stop-dev | logs [SERVICE] | status
# Uses `docker compose`, `podman compose`, podman-compose or docker-compose, whichever works here.
set -euo pipefail
cd "$(dirname "$0")"
project="quillgpt-dev"
modes="  start-dev   build the image and start the api and playground services
  stop-dev    stop and remove them
  logs        follow their logs (optionally of one service: logs api)
  status      list the services and their health"

compose() {
    if command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
        docker compose -p "$project" -f compose.yaml "$@"
    elif command -v podman >/dev/null 2>&1 && podman compose version >/dev/null 2>&1; then
        podman compose -p "$project" -f compose.yaml "$@"
    elif command -v podman-compose >/dev/null 2>&1; then
        podman-compose -p "$project" -f compose.yaml "$@"
    elif command -v docker-compose >/dev/null 2>&1; then
        docker-compose -p "$project" -f compose.yaml "$@"
    else
        echo "run.sh: no compose tool found (docker compose, podman compose, podman-compose or docker-compose)" >&2
        exit 1
    fi
}

case "${1:-}" in
    start-dev)
        compose build
        compose up -d
        echo "api: http://127.0.0.1:${QUILL_API_PORTS:-8080}  playground: http://127.0.0.1:${QUILL_PLAYGROUND_PORT:-8501}"
        ;;
    stop-dev) compose down ;;
    logs) shift; compose logs -f --tail=200 "$@" ;;
    status) compose ps ;;
    *)
        printf 'Invalid mode %s\nPlease enter one of the following modes:\n%s\n' "'${1:-}'" "$modes" >&2
        exit 2
        ;;
esac
