#!/bin/sh
# Stand-ins of the images compose.yml names, for a machine that cannot reach Docker Hub (the
# development and CI machines of this project): a Debian bookworm root file system made by
# debootstrap and imported as a base image, then one Dockerfile per image built FROM it with
# Debian's packages, tagged with the names compose.yml uses. compose.yml itself keeps the
# official pinned images; operators pull those, never these.
#
#   deploy/standins/build.sh            # build what is missing (images already there are kept)
#   WIS2_STANDINS_REBUILD=1 deploy/standins/build.sh   # rebuild them all
#   deploy/standins/build.sh --chain [docker build options]  # then the chain image (Dockerfile)
#
# Settings (environment): WIS2_STANDINS_CACHE (debootstrap's .deb cache, kept between builds;
# default ~/.cache/wis2-chain/debootstrap), WIS2_PROXY_CA (the CA bundle of a TLS-intercepting
# proxy, handed to pip as a build secret; default: the host's CA bundle), DEBIAN_MIRROR, DOCKER.
# Needs root (debootstrap) and a Docker Engine with BuildKit.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${WIS2_STANDINS_CACHE:-${HOME:-/root}/.cache/wis2-chain/debootstrap}
CA=${WIS2_PROXY_CA:-/etc/ssl/certs/ca-certificates.crt}
BASE=wis2-standin/debian:bookworm
# The docker client with BuildKit: the Docker CLI's buildx plugin, or a 20.10 client's own.
if [ -z "${DOCKER:-}" ]; then
    DOCKER=docker
    if ! docker buildx version >/dev/null 2>&1 && [ -x /usr/bin/docker ]; then
        DOCKER=/usr/bin/docker
    fi
fi
export DOCKER_BUILDKIT=1

missing() {
    [ -n "${WIS2_STANDINS_REBUILD:-}" ] || ! $DOCKER image inspect "$1" >/dev/null 2>&1
}

log() { echo "standins: $*" >&2; }

if missing "$BASE"; then
    log "debootstrap bookworm -> $BASE (cache $CACHE)"
    mkdir -p "$CACHE"
    root=$(mktemp -d /tmp/wis2-standin-rootfs.XXXXXX)
    trap 'rm -rf "$root"' EXIT
    debootstrap --variant=minbase --cache-dir="$CACHE" bookworm "$root" "$MIRROR" >&2
    cat > "$root/etc/apt/sources.list" <<SOURCES
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
SOURCES
    # as Debian's official images: no service starts while packages install in a build
    printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
    chmod 755 "$root/usr/sbin/policy-rc.d"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | $DOCKER import --change 'CMD ["/bin/bash"]' \
        --change 'ENV LANG=C.UTF-8' - "$BASE" >&2
    rm -rf "$root"
    trap - EXIT
fi

# image tag, Dockerfile (in this directory); in this order (prefect builds FROM python's).
while read -r tag dockerfile; do
    [ -n "$tag" ] || continue
    if missing "$tag"; then
        log "building $tag from $dockerfile"
        $DOCKER build --secret "id=proxy_ca,src=$CA" -f "$HERE/$dockerfile" -t "$tag" "$HERE" >&2
    fi
done <<IMAGES
python:3.11.11-slim-bookworm python.Dockerfile
eclipse-mosquitto:2.0.20 mosquitto.Dockerfile
postgres:16.4-bookworm postgres.Dockerfile
redis:7.4.1-bookworm redis.Dockerfile
nginx:1.27.3-alpine nginx.Dockerfile
prefecthq/prefect:3.9.1-python3.11 prefect.Dockerfile
IMAGES
log "all stand-in images present"

if [ "${1:-}" = --chain ]; then
    shift
    log "building wis2-chain:0.1.0 (the project Dockerfile)"
    previous=$($DOCKER image inspect -f '{{.Id}}' wis2-chain:0.1.0 2>/dev/null || true)
    $DOCKER build --secret "id=proxy_ca,src=$CA" -t wis2-chain:0.1.0 "$@" "$HERE/../.." >&2
    # the image it replaced, unless a container still uses it
    if [ -n "$previous" ] && [ "$previous" != "$($DOCKER image inspect -f '{{.Id}}' wis2-chain:0.1.0)" ]; then
        $DOCKER rmi "$previous" >/dev/null 2>&1 || true
    fi
fi
