#!/usr/bin/env bash
# Install the system packages Workbench needs, only those that are missing (Debian/Ubuntu).
# Used by `make up` and `make test` (with --browser: only the browser the browser tests drive); safe to run again.
set -euo pipefail
need=()
[ -x /usr/bin/python3 ] || need+=(python3)
/usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
command -v useradd >/dev/null 2>&1 || need+=(passwd)
# nft: as root the Dask gateway lets only a cluster's owner reach its loopback ports (workbench.gateway.portguard);
# without root it is of no use (clusters run as the gateway's own account), so it is not asked for then
if [ "$(id -u)" = 0 ] && ! PATH="$PATH:/usr/sbin:/sbin" command -v nft >/dev/null 2>&1; then need+=(nftables); fi
if [ "${1:-}" = --browser ]; then  # `make test`: a real browser for tests/browser (Debian's, no download)
  need=()
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
fi
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "Workbench needs these system packages: ${need[*]}" >&2
  echo "Install them (sudo apt-get install -y ${need[*]}) and run make again." >&2
  exit 1
fi
echo "[workbench] installing system packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${need[@]}" >/dev/null
