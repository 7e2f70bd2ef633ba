#!/usr/bin/env bash
# Set up pacs-harness in ./.venv on Debian/Ubuntu.
#
#   ./setup.sh                  Python packages only: the embedded PACS is the default node
#   ./setup.sh --with-servers   also Orthanc (+ DICOMweb, PostgreSQL plugins), DCMTK,
#                               PixelMed, CTN, MariaDB, PostgreSQL and HAProxy from apt, and the Allure command line
#                               (Java from apt, allure-commandline from npm) for
#                               `pacs-harness report --allure` (root)
#   ./setup.sh --with-docker    also Docker (docker.io) and debootstrap, to run nodes as
#                               containers built without a registry (root)
#   ./setup.sh --dev            also the test and lint tools (and, as root, Debian's
#                               chromium for the HTML report's browser tests)
set -euo pipefail
cd "$(dirname "$0")"

with_servers=0
with_docker=0
dev=0
for arg in "$@"; do
  case "$arg" in
    --with-servers) with_servers=1 ;;
    --with-docker) with_docker=1 ;;
    --dev) dev=1 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $arg (allowed: --with-servers, --with-docker, --dev)" >&2
       exit 2 ;;
  esac
done

apt_install() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh: need root to apt-get install $* (run with sudo)" >&2
    exit 3
  fi
  if [ -z "${PACS_HARNESS_APT_UPDATED:-}" ]; then
    apt-get update -qq
    export PACS_HARNESS_APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

python=${PYTHON:-python3}
if ! command -v "$python" >/dev/null; then
  apt_install python3 python3-venv python3-pip
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup.sh: $("$python" --version) is too old: pacs-harness needs Python 3.11+" >&2
  exit 3
fi
if ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then
  apt_install python3-venv
fi

if [ "$with_servers" = 1 ]; then
  missing=()
  [ -x /usr/sbin/Orthanc ] || missing+=(orthanc)
  [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)
  [ -x /usr/bin/dcmqrscp ] || missing+=(dcmtk)
  [ -e /usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so ] || missing+=(orthanc-postgresql)
  ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing+=(postgresql)
  command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
  # the security tests check certificates and handshakes with OpenSSL's own tools
  [ -x /usr/bin/openssl ] || missing+=(openssl)
  # PixelMed's archive (node kind pixelmed), run in a network namespace of its own
  [ -e /usr/share/java/pixelmed.jar ] || missing+=(libpixelmed-java)
  command -v ip >/dev/null || [ -x /usr/sbin/ip ] || missing+=(iproute2)
  # CTN's archive_server (node kind ctn), which keeps its index in a MariaDB of its own
  [ -x /usr/bin/archive_server ] || missing+=(ctn)
  command -v mariadbd >/dev/null || [ -x /usr/sbin/mariadbd ] || missing+=(mariadb-server-core)
  command -v mariadb >/dev/null || missing+=(mariadb-client-core)
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing ${missing[*]}"
    apt_install "${missing[@]}"
  fi
fi

if [ "$with_servers" = 1 ]; then
  # the Allure report (`pacs-harness report --allure`) runs Allure 2, a Java program
  # published on npm as allure-commandline
  command -v java >/dev/null || { echo "installing default-jre-headless"; apt_install default-jre-headless; }
  if ! command -v allure >/dev/null; then
    command -v npm >/dev/null || { echo "installing npm"; apt_install npm; }
    if [ "$(id -u)" -ne 0 ]; then
      echo "setup.sh: need root to npm install -g allure-commandline (run with sudo)" >&2
      exit 3
    fi
    echo "installing allure-commandline (npm)"
    npm install -g --no-fund --no-audit allure-commandline >/dev/null
    command -v allure >/dev/null || {
      echo "setup.sh: allure not on PATH after npm install -g (npm prefix: $(npm prefix -g))" >&2
      exit 3
    }
  fi
fi

if [ "$with_docker" = 1 ]; then
  missing=()
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing ${missing[*]}"
    apt_install "${missing[@]}"
  fi
fi

if [ "$dev" = 1 ] && [ "$(id -u)" -eq 0 ] && ! command -v chromium >/dev/null; then
  echo "installing chromium (browser tests of the HTML report)"
  apt_install chromium
fi

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
extras=""
[ "$dev" = 1 ] && extras="[dev]"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}" 2>&1 \
  | grep -v -e "WARNING: Location" -e "Running pip as the 'root' user" || true
.venv/bin/python -c "import harness, pynetdicom" || { echo "setup.sh: install failed" >&2; exit 3; }
echo "pacs-harness ready: .venv/bin/pacs-harness --help"
