"""A client built from proto/ alone (no import of this package) can call the service, exactly as the README shows."""

import re
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_blocks() -> tuple[str, str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("<!-- proto-only-client") :]
    shell, python = re.findall(r"```(?:bash|python)\n(.*?)```", section, re.S)[:2]
    return shell.strip(), python


def test_the_readme_proto_only_client_works_against_a_running_server(tmp_path, server):
    shell, python = _readme_blocks()
    args = shlex.split(shell)
    assert args[:3] == ["python", "-m", "grpc_tools.protoc"]
    # protoc run from the repository root, writing into the client's own directory
    args = [sys.executable, *args[1:]]
    args = [a.replace("--python_out=.", f"--python_out={tmp_path}").replace("--grpc_python_out=.", f"--grpc_python_out={tmp_path}") for a in args]
    subprocess.run(args, cwd=ROOT, check=True)
    script = python.replace("127.0.0.1:50051", server.grpc_target)
    # -S: no site processing, so this package's editable install is not on the path; only grpc and protobuf are.
    prelude = f"import sys; sys.path[:0] = [{str(tmp_path)!r}, {sysconfig.get_paths()['purelib']!r}, {sysconfig.get_paths()['platlib']!r}]\n"
    check = "\nimport monosemantic; assert monosemantic.__path__[0].startswith(%r), monosemantic.__path__\n" % str(tmp_path)
    result = subprocess.run([sys.executable, "-S", "-c", prelude + script + check], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "def" in result.stdout and "[length]" in result.stdout
