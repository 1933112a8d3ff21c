#!/usr/bin/env bash
# CI's Docker stage: lint the Dockerfiles, validate every compose file, then build the image and run
# it for real with a private Docker daemon: compose up --wait, curl the API, two replicas behind
# nginx, teardown (always). Run as root from the repo root after `make install`.
#
# The daemon leaves the host's network alone (--bridge=none, no iptables): containers use host
# networking on loopback ports of their own. Base images cannot be pulled here, so a stand-in for
# python:3.11-slim is built from debootstrap (cached in $CACHE between runs).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/.venv
WORK=$(mktemp -d /tmp/textgen-docker.XXXXXX)
CACHE=${TEXTGEN_CI_CACHE:-/var/cache/textgen-ci}
SOCK=$WORK/docker.sock
export DOCKER_HOST=unix://$SOCK
export DOCKER_CONFIG=$WORK/config
export BASE_IMAGE=local/python:3.11
PROJECTS=()
step() { echo; echo "== docker: $* ($(date +%T))"; }

cleanup() {
    local rc=$?
    step "teardown"
    if [ -S "$SOCK" ]; then
        for args in "${PROJECTS[@]}"; do
            # shellcheck disable=SC2086
            docker compose $args down -v --remove-orphans --timeout 20 >/dev/null 2>&1 || true
        done
        docker ps -aq | xargs -r docker rm -f >/dev/null 2>&1 || true
    fi
    if [ -f "$WORK/dockerd.pid" ]; then
        local pid
        pid=$(cat "$WORK/dockerd.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    fi
    # anything the daemon left mounted under its roots
    grep -o " $WORK[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    rm -rf "$WORK" "$ROOT"/docker/wheels/*.whl
    echo "teardown done (exit $rc)"
    exit $rc
}
trap cleanup EXIT

step "tools: docker.io, debootstrap, compose plugin, hadolint"
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q docker.io debootstrap >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q docker.io debootstrap >/dev/null; }
fi
mkdir -p "$DOCKER_CONFIG/cli-plugins"
ln -sf "$("$VENV/bin/python" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')" \
    "$DOCKER_CONFIG/cli-plugins/docker-compose"
docker compose version

step "hadolint"
"$VENV/bin/hadolint" Dockerfile deploy/nginx/Dockerfile docker/ci/base.Dockerfile && echo "hadolint: clean"

step "docker compose config -q, every file and profile"
for files in "docker-compose.yml" "docker-compose.yml docker-compose.gpu.yml" "docker-compose.scale.yml" \
             "docker-compose.yml docker/ci/compose.ci.yml" "docker-compose.scale.yml docker/ci/compose.scale.ci.yml"; do
    args=""; for f in $files; do args="$args -f $f"; done
    # shellcheck disable=SC2086
    docker compose $args config -q && echo "valid: $files"
done

step "dockerd on a private socket"
dockerd --bridge=none --iptables=false --ip6tables=false --ip-forward=false -H "$DOCKER_HOST" \
    --data-root "$WORK/data" --exec-root "$WORK/exec" --pidfile "$WORK/dockerd.pid" >"$WORK/dockerd.log" 2>&1 &
for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
docker info --format 'docker {{.ServerVersion}}, storage {{.Driver}}'

step "stand-in base image $BASE_IMAGE (debootstrap bookworm minbase)"
mkdir -p "$CACHE"
if [ ! -f "$CACHE/bookworm-minbase.tar" ]; then
    debootstrap --variant=minbase bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log"; exit 1; }
    tar -C "$WORK/rootfs" -cf "$CACHE/bookworm-minbase.tar" .
    rm -rf "$WORK/rootfs"
fi
docker import "$CACHE/bookworm-minbase.tar" local/debian:bookworm >/dev/null
mkdir -p "$WORK/base/certs"
cp /usr/local/share/ca-certificates/*.crt "$WORK/base/certs/" 2>/dev/null || true
docker build -q --network host -t "$BASE_IMAGE" -f docker/ci/base.Dockerfile "$WORK/base" >/dev/null
docker run --rm "$BASE_IMAGE" python3 --version

step "build textgen:cpu (CPU torch wheel from /opt/wheels when there is one)"
cp /opt/wheels/torch-2.13.0*.whl docker/wheels/ 2>/dev/null || true
started=$(date +%s)
docker build --network host --build-arg BASE_IMAGE="$BASE_IMAGE" -t textgen:cpu . >"$WORK/build.log" 2>&1 \
    || { tail -40 "$WORK/build.log"; exit 1; }
echo "built in $(( $(date +%s) - started ))s"
docker image ls textgen:cpu --format 'image textgen:cpu: {{.Size}}'
echo "runs as uid: $(docker run --rm --entrypoint id textgen:cpu -u)"
test "$(docker run --rm --entrypoint id textgen:cpu -u)" != 0
echo "models in the image: $(docker run --rm --entrypoint ls textgen:cpu /models | tr '\n' ' ')"
docker build -q --network host --build-arg BASE_IMAGE="$BASE_IMAGE" -t textgen-nginx:latest deploy/nginx >/dev/null

step "docker compose up --wait (one replica)"
ONE="-f docker-compose.yml -f docker/ci/compose.ci.yml"
PROJECTS+=("$ONE")
# shellcheck disable=SC2086
docker compose $ONE up -d --wait --no-build --pull never
# shellcheck disable=SC2086
docker compose $ONE ps --format '{{.Name}}: {{.Status}}'
URL=http://127.0.0.1:18000
curl -sf "$URL/ready"; echo
answer=$(curl -sf "$URL/generate" -H 'content-type: application/json' \
    -d '{"prompt": "The quick brown fox", "max_length": 40, "temperature": 0.7, "do_sample": true, "seed": 1}')
echo "/generate: $answer"
echo "$answer" | "$VENV/bin/python" -c 'import json, sys; b = json.load(sys.stdin); assert b["generations"][0]["text"].strip() and b["model"] == "smollm2-135m-instruct", b'
# the image carries a C compiler: the decode attention kernel is built for this CPU, not the torch path
attention=$(curl -sf "$URL/info" | "$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["engine"]["decode_attention"])')
echo "/info decode_attention: $attention"
test "$attention" = ragged-c-kernel
answer=$(curl -sf "$URL/sentiment" -H 'content-type: application/json' -d '{"texts": ["A wonderful, moving film.", "Dull and far too long."]}')
echo "/sentiment: $answer"
echo "$answer" | "$VENV/bin/python" -c 'import json, sys; b = json.load(sys.stdin); assert [r["label"] for r in b["results"]] == ["positive", "negative"], b'
# shellcheck disable=SC2086
docker compose $ONE down -v --timeout 45
PROJECTS=()

step "scale-out: 2 replicas behind nginx"
SCALE="-f docker-compose.scale.yml -f docker/ci/compose.scale.ci.yml"
PROJECTS+=("$SCALE")
# shellcheck disable=SC2086
docker compose $SCALE up -d --wait --no-build --pull never
# shellcheck disable=SC2086
docker compose $SCALE ps --format '{{.Name}}: {{.Status}}'
: >"$WORK/upstreams"
clients=()
for i in $(seq 1 8); do  # concurrent, so least-connections spreads them
    curl -sf -D - -o /dev/null "$URL/generate" -H 'content-type: application/json' \
        -d "{\"prompt\": \"Request $i:\", \"max_new_tokens\": 8}" | tr -d '\r' | grep -i '^x-upstream:' >>"$WORK/upstreams" &
    clients+=($!)
done
wait "${clients[@]}"  # not a bare `wait`: dockerd is a background job too
sort "$WORK/upstreams" | uniq -c
test "$(sort -u "$WORK/upstreams" | wc -l)" -eq 2
echo "both replicas served through nginx"
# shellcheck disable=SC2086
docker compose $SCALE down -v --timeout 45
PROJECTS=()
