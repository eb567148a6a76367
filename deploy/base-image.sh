#!/usr/bin/env bash
# Makes a Debian bookworm base image locally, for machines that no image registry serves: debootstrap a minimal
# root file system from Debian's package mirror (with tini and CA certificates), then `docker import` it.
#
#   deploy/base-image.sh [TAG]        # default TAG: moe-mesh-base:bookworm
#   docker build -f deploy/Dockerfile --build-arg BASE=moe-mesh-base:bookworm ...
#
# Needs root (debootstrap), debootstrap itself (Debian: apt install debootstrap) and a running Docker daemon.
# MIRROR overrides the mirror [http://deb.debian.org/debian]. Does nothing when TAG already exists.
set -euo pipefail

tag="${1:-moe-mesh-base:bookworm}"
mirror="${MIRROR:-http://deb.debian.org/debian}"

if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "$tag exists"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is not installed (apt install debootstrap)" >&2; exit 1; }

root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
echo "== debootstrap bookworm into $root (about a minute)"
debootstrap --variant=minbase --include=tini,ca-certificates bookworm "$root" "$mirror" >"$root.log" 2>&1 || {
  tail -n 20 "$root.log" >&2
  exit 1
}
rm -f "$root.log"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
echo "== docker import as $tag"
tar -C "$root" -c . | docker import - "$tag" >/dev/null
echo "$tag built"
