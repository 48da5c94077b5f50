"""`python -m syncml_lib doctor`: a report, exit 0 when all is well, the remedy and exit 1 when not."""
import subprocess
import sys

from syncml_lib import __main__ as doctor_module
from syncml_lib.mpirun import MPINotFoundError


def test_doctor_passes_here_with_a_cluster():
    proc = subprocess.run([sys.executable, "-m", "syncml_lib", "doctor", "--ranks", "3"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for what in ("Python", "numpy", "mpi4py", "MPI library", "mpiexec -n 3", "ipyparallel cluster"):
        assert f"[ok] {what}" in proc.stdout
    assert "Allreduce of rank+1 = 6 on every rank" in proc.stdout
    assert "all checks passed" in proc.stdout


def test_doctor_without_mpi4py_fails_with_the_remedy():
    code = ("import sys; sys.modules['mpi4py'] = None\n"
            "from syncml_lib.__main__ import main; sys.exit(main(['doctor', '--skip-cluster']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "[FAIL] mpi4py" in proc.stdout and "pip install mpich mpi4py" in proc.stdout


def test_doctor_without_mpiexec_fails_with_the_remedy(monkeypatch):
    def no_mpiexec():
        raise MPINotFoundError("no mpiexec")

    monkeypatch.setattr(doctor_module.mpirun, "mpiexec_path", no_mpiexec)
    lines = []
    failed = doctor_module.doctor(cluster=False, out=lines.append)
    assert failed == 1
    assert any("[FAIL] mpiexec" in line for line in lines)


def test_unknown_command_prints_usage():
    proc = subprocess.run([sys.executable, "-m", "syncml_lib", "frobnicate"], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage: python -m syncml_lib doctor" in proc.stdout
