#!/usr/bin/env bash
# Builds, vets and tests the Go client against a live server (the tests start
# one: see server_test.go for HALFLIFE_BIN and HALFLIFE_TEST_MODEL_DIR).
#
#   HALFLIFE_GO_MODE=module  the normal module proxy resolves go.mod (go.sum is
#                            written by `go mod tidy` on first use).
#   HALFLIFE_GO_MODE=debian  offline: GOPATH mode against Debian 12's packages
#                            in /usr/share/gocode (golang-google-grpc-dev,
#                            golang-google-protobuf-dev, golang-google-genproto-dev,
#                            golang-github-golang-protobuf-1-5-dev). CI uses this.
#   unset                    debian when those packages are installed, module
#                            otherwise.
# Extra arguments go to `go test` (e.g. -run TestEmbed -v).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
module=github.com/halflife/halflife/clients/go
gocode=/usr/share/gocode

command -v go >/dev/null || { echo "clients/go: no Go toolchain: install golang-go (apt) or Go >= 1.19" >&2; exit 1; }
mode="${HALFLIFE_GO_MODE:-}"
if [ -z "$mode" ]; then
    if [ -d "$gocode/src/google.golang.org/grpc" ] && [ -d "$gocode/src/google.golang.org/genproto/googleapis/rpc/errdetails" ]; then
        mode=debian
    else
        mode=module
    fi
fi
export HALFLIFE_BIN="${HALFLIFE_BIN:-$repo/.venv/bin/halflife}"
[ -n "${HOME:-}" ] || export GOCACHE="${GOCACHE:-${TMPDIR:-/tmp}/halflife-go-cache}"
echo "clients/go: $mode mode ($(go version))"

case "$mode" in
module)
    cd "$here"
    [ -f go.sum ] || go mod tidy
    go vet ./...
    go test -count=1 "$@" ./...
    ;;
debian)
    for pkg in google.golang.org/grpc google.golang.org/protobuf google.golang.org/genproto/googleapis/rpc/errdetails github.com/golang/protobuf/ptypes; do
        [ -d "$gocode/src/$pkg" ] || { echo "clients/go: $gocode/src/$pkg missing: apt-get install golang-google-grpc-dev golang-google-protobuf-dev golang-google-genproto-dev golang-github-golang-protobuf-1-5-dev" >&2; exit 1; }
    done
    # Debian's default github.com/golang/protobuf (1.3) panics at run time
    # with the APIv2 runtime; 1.5 registers itself as the same path.
    grep -q 'protoimpl' "$gocode/src/github.com/golang/protobuf/proto/registry.go" 2>/dev/null || {
        echo "clients/go: $gocode holds github.com/golang/protobuf 1.3; install golang-github-golang-protobuf-1-5-dev" >&2; exit 1; }
    gopath="$(mktemp -d)"
    trap 'rm -rf "$gopath"' EXIT
    mkdir -p "$gopath/src/$(dirname "$module")"
    ln -s "$here" "$gopath/src/$module"
    cd "$gopath/src/$module"
    export GO111MODULE=off GOPATH="$gopath:$gocode" GOFLAGS= GOPROXY=off
    go vet ./...
    go test -count=1 "$@" ./...
    ;;
*)
    echo "clients/go: HALFLIFE_GO_MODE must be module or debian, not '$mode'" >&2; exit 2 ;;
esac
