#!/usr/bin/env bash
# Oracle MySQL 9.7 (Debian's mysql-server-core, from sid) on 127.0.0.1:3307, beside MariaDB on 3306.
#
#   tests/servers/mysql97.sh [start]   # build the chroot if needed, start the server if not running
#   tests/servers/mysql97.sh stop      # stop the server started here (by its PID file)
#   tests/servers/mysql97.sh status    # exit 0 when it answers on the port
#
# Debian's MySQL 9.7 needs a newer glibc than bookworm's, so it runs in a Debian sid chroot
# (debootstrap --variant=minbase, from the same mirror), kept in TI_GUARD_MYSQL97_DIR (default
# ~/.cache/ti-guard/mysql97) between runs; the data directory lives inside it. Root has an empty
# password and is reachable over TCP; database `test` exists. Every step is safe to rerun.
set -euo pipefail

MIRROR=${TI_GUARD_DEBIAN_MIRROR:-http://deb.debian.org/debian}
DIR=${TI_GUARD_MYSQL97_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ti-guard/mysql97}
PORT=${TI_GUARD_MYSQL97_PORT:-3307}
ROOT=$DIR/root
PIDFILE=$DIR/mysqld.pid
DATA=/var/lib/ti-guard-mysql          # inside the chroot
PACKAGES=(mysql-server-core mysql-client-core)

say() { echo "mysql97: $*" >&2; }

ping_server() {
  [ -x "$ROOT/usr/bin/mysqladmin" ] &&
    chroot "$ROOT" /usr/bin/mysqladmin --protocol=tcp -h127.0.0.1 -P"$PORT" -uroot ping >/dev/null 2>&1
}

running_pid() {
  local pid
  [ -f "$PIDFILE" ] || return 1
  pid=$(cat "$PIDFILE")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

# debootstrap mounts /proc and /sys inside the target; never rm -rf through a mount.
unmount_under() {
  awk -v d="$1/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r | xargs -r -n1 umount -l
}

build_chroot() {
  [ -e "$ROOT/.ti-guard-complete" ] && return 0
  local started=$SECONDS tmp=$DIR/root.building
  if ! command -v debootstrap >/dev/null; then
    say "installing debootstrap"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  fi
  unmount_under "$tmp"; rm -rf "$tmp" && mkdir -p "$DIR"
  say "debootstrap sid into $tmp"
  debootstrap --variant=minbase sid "$tmp" "$MIRROR" >"$DIR/debootstrap.log" 2>&1 \
    || { say "debootstrap failed, see $DIR/debootstrap.log"; tail -5 "$DIR/debootstrap.log" >&2; exit 1; }
  # The mirror's sid Release file can be past its Valid-Until date.
  echo 'Acquire::Check-Valid-Until "false";' >"$tmp/etc/apt/apt.conf.d/99ti-guard-valid-until"
  # Don't let package scripts start services inside the chroot.
  printf '#!/bin/sh\nexit 101\n' >"$tmp/usr/sbin/policy-rc.d" && chmod +x "$tmp/usr/sbin/policy-rc.d"
  chroot "$tmp" apt-get update -qq >>"$DIR/debootstrap.log" 2>&1
  DEBIAN_FRONTEND=noninteractive chroot "$tmp" apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" \
    >>"$DIR/debootstrap.log" 2>&1 || { say "apt-get install failed, see $DIR/debootstrap.log"; exit 1; }
  chroot "$tmp" apt-get clean
  chroot "$tmp" dpkg-query -W -f='${Package} ${Version}\n' "${PACKAGES[@]}" >"$tmp/.ti-guard-complete"
  unmount_under "$tmp"; unmount_under "$ROOT"; rm -rf "$ROOT" && mv "$tmp" "$ROOT"
  say "chroot ready in $((SECONDS - started)) s: $(tr '\n' ' ' <"$ROOT/.ti-guard-complete")"
}

start() {
  if running_pid >/dev/null && ping_server; then
    say "already running (pid $(running_pid)) on 127.0.0.1:$PORT"; return 0
  fi
  if ping_server; then say "a server not started here already answers on 127.0.0.1:$PORT as root: using it ($0 stop will not stop it)"; return 0; fi
  build_chroot
  local started=$SECONDS
  mkdir -p "$ROOT/run/mysqld" "$ROOT/tmp" "$ROOT/var/lib/mysql-files"  # the last: its default secure_file_priv
  if [ ! -d "$ROOT$DATA/mysql" ]; then
    rm -rf "$ROOT$DATA"
    chroot "$ROOT" /usr/sbin/mysqld --no-defaults --initialize-insecure --user=root --datadir="$DATA" \
      >"$DIR/initialize.log" 2>&1 || { say "mysqld --initialize failed, see $DIR/initialize.log"; exit 1; }
  fi
  cat >"$ROOT/etc/ti-guard-init.sql" <<SQL
CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY '';
GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;
CREATE DATABASE IF NOT EXISTS test;
SQL
  # The server's defaults are kept on purpose (binary logging on, caching_sha2_password, strict
  # mode): the tests must meet MySQL as users do. Only where it listens and what it starts with are set.
  setsid chroot "$ROOT" /usr/sbin/mysqld --no-defaults --user=root --datadir="$DATA" \
    --port="$PORT" --bind-address=127.0.0.1 --socket=/run/mysqld/mysqld.sock --mysqlx=OFF \
    --log-error="$DATA/error.log" --init-file=/etc/ti-guard-init.sql \
    --binlog-expire-logs-seconds=86400 </dev/null >/dev/null 2>&1 &
  echo $! >"$PIDFILE"
  for _ in $(seq 120); do
    if ping_server; then say "running (pid $(cat "$PIDFILE")) on 127.0.0.1:$PORT, up in $((SECONDS - started)) s"; return 0; fi
    running_pid >/dev/null || break
    sleep 0.5
  done
  say "mysqld did not come up; last lines of $ROOT$DATA/error.log:"; tail -20 "$ROOT$DATA/error.log" >&2 || true
  exit 1
}

stop() {
  local pid
  if ! pid=$(running_pid); then say "not running"; rm -f "$PIDFILE"; return 0; fi
  kill "$pid"
  for _ in $(seq 120); do kill -0 "$pid" 2>/dev/null || { rm -f "$PIDFILE"; say "stopped (pid $pid)"; return 0; }; sleep 0.5; done
  say "pid $pid did not stop within 60 s"; exit 1
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) ping_server ;;
  *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
