#!/usr/bin/env bash
# Installs the peers of the shardcast comparison from the package registries and builds the
# gorilla hub offline and the C reference relay, then prints the versions. Idempotent: a peer already installed at the
# pinned version is left alone.
#
#   benches/peers/install.sh [PEER...]     PEER: bun node-ws nchan gorilla python refrelay
#                                          (default: all)
#   benches/peers/install.sh --versions    only print the versions of what is installed
#
# Skip a peer with SKIP_BUN=1, SKIP_NODE_WS=1, SKIP_NCHAN=1, SKIP_GORILLA=1, SKIP_PYTHON=1 or
# SKIP_REFRELAY=1. APT=0 never runs apt-get (the Debian packages must then be installed
# already). Sources: npm (bun, ws; pinned in package.json and package-lock.json), PyPI
# (websockets, pinned in python/requirements.txt), Debian (nginx-light, libnginx-mod-nchan,
# golang-go, golang-github-gorilla-websocket-dev; gcc and libc6-dev for refrelay, only if
# gcc is missing). Run as root for apt-get.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
all=(bun node-ws nchan gorilla python refrelay)

versions() {
    local v
    echo "versions:"
    if [[ -x "$here/bun/node_modules/.bin/bun" ]]; then
        echo "  bun        $("$here/bun/node_modules/.bin/bun" --version) (npm package bun)"
    fi
    if [[ -f "$here/node-ws/node_modules/ws/package.json" ]]; then
        v="$(node -p "require('$here/node-ws/node_modules/ws/package.json').version")"
        echo "  node-ws    ws $v on node $(node --version)"
    fi
    if v="$(dpkg-query -W -f='${Version}' libnginx-mod-nchan 2>/dev/null)" && [[ -n "$v" ]]; then
        echo "  nchan      libnginx-mod-nchan $v, nginx-light $(dpkg-query -W -f='${Version}' nginx-light 2>/dev/null || echo '?')"
    fi
    if [[ -x "$here/gorilla/bin/gorilla-peer" ]]; then
        v="$(dpkg-query -W -f='${Version}' golang-github-gorilla-websocket-dev 2>/dev/null || echo '?')"
        echo "  gorilla    gorilla/websocket $v (Debian), $(go version | cut -d' ' -f3)"
    fi
    if [[ -x "$here/python/.venv/bin/python" ]]; then
        echo "  python     $("$here/python/.venv/bin/python" -c 'import sys, websockets; print(f"websockets {websockets.__version__} on python {sys.version.split()[0]}")')"
    fi
    if [[ -x "$here/refrelay/bin/refrelay" ]]; then
        echo "  refrelay   refrelay.c built with gcc $(gcc -dumpfullversion 2>/dev/null || echo '?') -O2"
    fi
}

if [[ "${1:-}" == "--versions" ]]; then
    versions
    exit 0
fi

wanted=("$@")
if [[ ${#wanted[@]} -eq 0 ]]; then
    wanted=("${all[@]}")
fi
for p in "${wanted[@]}"; do
    case " ${all[*]} " in
        *" $p "*) ;;
        *) echo "unknown peer '$p'; choose from: ${all[*]}" >&2; exit 2 ;;
    esac
done

selected() { # selected PEER: wanted and not skipped
    local var="SKIP_$(echo "$1" | tr 'a-z-' 'A-Z_')"
    [[ "${!var:-0}" != 1 ]] || return 1
    case " ${wanted[*]} " in *" $1 "*) return 0 ;; esac
    return 1
}

# Debian packages, installed only if missing. A policy-rc.d that forbids service starts is
# put in place for the duration, so installing nginx does not start a system nginx on
# port 80 (the peer runs its own nginx from nchan/start.sh).
apt_updated=0
apt_install() {
    local missing=() pkg
    for pkg in "$@"; do
        if [[ "$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null)" != installed ]]; then
            missing+=("$pkg")
        fi
    done
    [[ ${#missing[@]} -gt 0 ]] || return 0
    if [[ "${APT:-1}" == 0 ]]; then
        echo "missing Debian packages (APT=0): ${missing[*]}" >&2
        return 1
    fi
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"
        chmod +x "$policy"
        made_policy=1
    fi
    if [[ $apt_updated == 0 ]]; then
        apt-get update -q
        apt_updated=1
    fi
    local rc=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" || rc=$?
    if [[ $made_policy == 1 ]]; then
        rm -f "$policy"
    fi
    return $rc
}

pinned() { # pinned DIR PACKAGE: the version package.json pins
    node -p "require('$here/$1/package.json').dependencies['$2']"
}

if selected bun; then
    echo "== bun (npm)"
    if [[ -x "$here/bun/node_modules/.bin/bun" ]] &&
        [[ "$("$here/bun/node_modules/.bin/bun" --version 2>/dev/null)" == "$(pinned bun bun)" ]]; then
        echo "already installed"
    else
        # bun's postinstall links the platform binary (from @oven/bun-linux-x64, also an
        # npm package) into node_modules/bun/bin; nothing is downloaded from elsewhere.
        (cd "$here/bun" && npm ci --no-audit --no-fund)
        "$here/bun/node_modules/.bin/bun" --version > /dev/null
    fi
fi

if selected node-ws; then
    echo "== node-ws (npm)"
    if [[ -f "$here/node-ws/node_modules/ws/package.json" ]] &&
        [[ "$(node -p "require('$here/node-ws/node_modules/ws/package.json').version")" == "$(pinned node-ws ws)" ]]; then
        echo "already installed"
    else
        (cd "$here/node-ws" && npm ci --no-audit --no-fund)
    fi
fi

if selected nchan; then
    echo "== nchan (Debian)"
    apt_install nginx-light libnginx-mod-nchan
fi

if selected gorilla; then
    echo "== gorilla (Debian Go and gorilla/websocket, built offline)"
    apt_install golang-go golang-github-gorilla-websocket-dev
    (cd "$here/gorilla" && GOPROXY=off GOFLAGS=-mod=mod go build -o bin/gorilla-peer .)
fi

if selected python; then
    echo "== python (PyPI, in python/.venv)"
    py="${PYTHON:-python3}"
    if [[ ! -x "$here/python/.venv/bin/python" ]]; then
        if ! "$py" -m venv "$here/python/.venv"; then
            # Debian's own python3 needs python3-venv for this.
            rm -rf "$here/python/.venv"
            apt_install python3-venv
            "$py" -m venv "$here/python/.venv"
        fi
    fi
    "$here/python/.venv/bin/pip" install -q --disable-pip-version-check -r "$here/python/requirements.txt"
fi

if selected refrelay; then
    echo "== refrelay (C, built with gcc)"
    command -v gcc > /dev/null || apt_install gcc libc6-dev
    "$here/refrelay/build.sh"
fi

versions
