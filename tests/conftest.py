import sys
from pathlib import Path

# tests/helpers.py and tests/etcd_fixtures.py are imported as plain modules by the test files.
sys.path.insert(0, str(Path(__file__).parent))

# Real-etcd fixtures (etcd, etcd_cluster3, etcd_tls, etcd_auth) for every test module.
pytest_plugins = ["etcd_fixtures"]
