#!/bin/sh
# Render an overlay and apply it only when every image names a registry you set.
#
# The overlays ship a placeholder image (set-your-registry.invalid/MADPO-RAY-IMAGE-NOT-SET): an
# invalid reference in a reserved domain, so a kubelet can pull nothing with it (InvalidImageName)
# and no one else can publish an image under it. This script refuses it, and an image without a
# registry host (the base's bare madpo-ray:TAG, which would come from Docker Hub), before applying.
#
#   k8s/apply.sh --check k8s/overlays/cpu       # render and check only (CI); exit 2 if not set
#   k8s/apply.sh k8s/overlays/cpu [kubectl apply flags, e.g. --dry-run=server]
set -eu
check_only=false
if [ "${1:-}" = "--check" ]; then check_only=true; shift; fi
overlay=${1:?usage: k8s/apply.sh [--check] OVERLAY [kubectl apply flags]}
shift
rendered=$(kubectl kustomize "$overlay")
images=$(printf '%s\n' "$rendered" | sed -n 's/^[[:space:]-]*image:[[:space:]]*//p' | tr -d "\"'" | sort -u)
bad=""
for image in $images; do
  case "$image" in
    *.invalid/* | *.invalid:*/* | */your-org/* | *[A-Z]*) bad="$bad $image"; continue ;;  # placeholder, invalid
    */*) ;;
    *) bad="$bad $image"; continue ;;                  # no registry host: Docker Hub's library/
  esac
  case "${image%%/*}" in
    *.* | *:* | localhost) ;;                           # a registry host
    *) bad="$bad $image" ;;                             # docker.io/<user>/... implied: say which registry
  esac
done
if [ -z "$images" ] || [ -n "$bad" ]; then
  echo "refusing $overlay: image not set:${bad:- none found}; push the image built from the Dockerfile and set newName/newTag under images: in $overlay/kustomization.yaml" >&2
  exit 2
fi
if [ "$check_only" = true ]; then
  echo "$overlay: images set: $(echo $images)"
  exit 0
fi
printf '%s\n' "$rendered" | kubectl apply -f - "$@"
