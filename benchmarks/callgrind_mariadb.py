"""A throwaway MariaDB under valgrind's callgrind: instructions per row, not seconds.

Wall and CPU time of a bulk UPDATE on MariaDB swing by 10-30% from run to run on a shared
machine, wider than the 5% the targets ask about. callgrind counts the instructions the server
thread running the statement executes, which repeat to within ~1% whatever else the machine is
doing. The server is started from the machine's own mariadbd in a temporary data directory, on
a port of its own, and removed afterwards; the service on 3306 is not touched.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time

import sqlalchemy as sa

MARIADBD = shutil.which("mariadbd") or "/usr/sbin/mariadbd"


def available() -> str:
    """Empty when a callgrind run can start here, else what is missing."""
    missing = [t for t in ("valgrind", "callgrind_control", "mariadb-install-db") if not shutil.which(t)]
    if not os.path.exists(MARIADBD):
        missing.append("mariadbd")
    return ", ".join(missing)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, folder: str, port: int, process: subprocess.Popen):
        self.folder, self.port, self.process = folder, port, process
        self.url = f"mysql+pymysql://root@127.0.0.1:{port}/test"

    def _control(self, *args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(self.process.pid)], check=True, capture_output=True, timeout=600)

    def instructions(self, run) -> int:
        """Instructions executed by the busiest server thread while run() ran.

        Counters are zeroed just before and dumped just after, one file per thread; the thread
        that executed the statement is by far the busiest one in that window.
        """
        self._control("-z")
        run()
        before = set(glob.glob(f"{self.folder}/callgrind.out.*"))
        self._control("-d")
        totals = []
        for path in set(glob.glob(f"{self.folder}/callgrind.out.*")) - before:
            with open(path) as f:
                totals += [int(line.split()[1]) for line in f if line.startswith(("summary:", "totals:"))][:1]
            os.remove(path)
        return max(totals)


@contextlib.contextmanager
def server():
    folder = tempfile.mkdtemp(prefix="ti_guard_callgrind_")
    process = None
    log = open(f"{folder}/server.log", "w")
    try:
        data = f"{folder}/data"
        subprocess.run(
            ["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root", "--auth-root-authentication-method=normal", "--skip-test-db"],
            check=True,
            capture_output=True,
        )
        port = _free_port()
        process = subprocess.Popen(
            # Counting starts switched off (startup runs at near native speed) and only the
            # measured statements are counted. Valgrind cannot reserve InnoDB's default virtual
            # size for the buffer pool, nor follow io_uring.
            ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes", f"--callgrind-out-file={folder}/callgrind.out.%p",
             MARIADBD, "--no-defaults", f"--datadir={data}", f"--socket={folder}/sock", f"--port={port}", "--bind-address=127.0.0.1",
             "--user=root", "--skip-log-bin", "--innodb-buffer-pool-size=512M", "--innodb-buffer-pool-size-max=1G", "--innodb-use-native-aio=0"],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        root = sa.create_engine(f"mysql+pymysql://root@127.0.0.1:{port}/")
        deadline = time.monotonic() + 300
        while True:
            try:
                with root.begin() as conn:
                    conn.exec_driver_sql("CREATE DATABASE test")
                break
            except sa.exc.OperationalError:
                if process.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    tail = open(f"{folder}/server.log").read().strip().splitlines()[-3:]
                    raise RuntimeError("MariaDB under callgrind did not start: " + " / ".join(tail)) from None
                time.sleep(2)
        root.dispose()
        srv = Server(folder, port, process)
        srv._control("-i", "on")
        yield srv
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()
        shutil.rmtree(folder, ignore_errors=True)
