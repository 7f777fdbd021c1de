"""Tags every metadata-DB connection of an Airflow component with the component's name, so the
production benchmark's observer trigger can say which writer changed a task instance's state.

Airflow imports CONNECT_ARGS through `[database] sql_alchemy_connect_args` (MySQL and MariaDB only:
PostgreSQL's libpq reads PGAPPNAME, which deployment.py sets per component). The name comes from
deployment.py's own TI_GUARD_WRITER, never from user input, and is checked before it goes into SQL.
"""

import os
import re

_writer = os.environ.get("TI_GUARD_WRITER", "unknown")
if not re.fullmatch(r"[a-z0-9-]{1,40}", _writer):
    _writer = "unknown"
CONNECT_ARGS = {"init_command": f"SET @tg_writer = '{_writer}'"}
