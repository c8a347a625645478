"""How the multi-process tests start `accelerate launch`.

Through this interpreter's `accelerate` package rather than an `accelerate` script looked up on
PATH: a plain `python -m pytest` (venv not activated) then runs the multi-process tests instead
of skipping them, and a broken launcher fails them.
"""

import socket
import sys

ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]

# What a launch needs beyond its flags: no GPU, no accelerate config file from this machine.
ACCELERATE_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: 'no'
gpu_ids: all
rdzv_backend: static
same_network: true
"""


def free_port() -> int:
    """A free TCP port on the loopback address, for the launch's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
