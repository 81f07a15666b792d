#!/usr/bin/env bash
# Install the Debian packages the test suite needs, skipping those already installed.
#
#   postgresql  - a real PostgreSQL server for the sink's integration tests
#   prometheus  - ships promtool, used to check the metrics and alert rules
#   kubernetes-client - kubectl, whose `kubectl kustomize` builds the Kubernetes overlays
#                  (skipped when a kubectl is already on PATH, whatever installed it)
#   ffmpeg      - serves live MPEG-TS and MJPEG streams on loopback for the camera
#                  producer's live-source tests
#   rtsp-server-perl - a real RTSP server (RTP over UDP) that FFmpeg publishes to, for
#                  the camera producer's RTSP test
#   prometheus-node-exporter - the host exporter whose series the host dashboard and
#                  alerts query, scraped by a real Prometheus in the tests
#
# Services are never started: the tests start their own servers in temporary directories.
# Safe to run repeatedly; with everything present it only queries dpkg.
set -euo pipefail

PACKAGES=(postgresql prometheus kubernetes-client ffmpeg rtsp-server-perl prometheus-node-exporter)

is_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

# What the tests use from each package, found without dpkg (e.g. installed another way).
has_tools() {
    case "$1" in
        postgresql)
            compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null \
                || command -v initdb >/dev/null 2>&1
            ;;
        prometheus) command -v promtool >/dev/null 2>&1 ;;
        kubernetes-client) command -v kubectl >/dev/null 2>&1 ;;
        ffmpeg) command -v ffmpeg >/dev/null 2>&1 ;;
        rtsp-server-perl) command -v rtsp-server-perl >/dev/null 2>&1 ;;
        prometheus-node-exporter) command -v prometheus-node-exporter >/dev/null 2>&1 ;;
        *) return 1 ;;
    esac
}

missing=()
for package in "${PACKAGES[@]}"; do
    if is_installed "$package" || has_tools "$package"; then
        echo "already installed: $package"
    else
        missing+=("$package")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: apt-get not found; install these packages yourself: ${missing[*]}" >&2
    exit 1
fi

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        sudo_cmd=(sudo)
    else
        echo "error: not root and no sudo; install these packages yourself: ${missing[*]}" >&2
        exit 1
    fi
fi

# Keep package scripts from starting services (no systemd in containers or CI runners).
policy_rc=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy_rc" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo_cmd[@]}" tee "$policy_rc" >/dev/null
    "${sudo_cmd[@]}" chmod 755 "$policy_rc"
    created_policy=1
fi
cleanup() {
    if [ "$created_policy" -eq 1 ]; then
        "${sudo_cmd[@]}" rm -f "$policy_rc"
    fi
}
trap cleanup EXIT

echo "installing: ${missing[*]}"
apt_options=(-y -q --no-install-recommends -o DPkg::Lock::Timeout=600)
"${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=600 update
"${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install "${apt_options[@]}" \
    "${missing[@]}"

for package in "${missing[@]}"; do
    if ! is_installed "$package"; then
        echo "error: $package did not install" >&2
        exit 1
    fi
done
echo "installed: ${missing[*]}"
