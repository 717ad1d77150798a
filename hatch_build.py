"""Hatch build hook: generates the gRPC Python stubs from proto/ into monosemantic/v1/ at build and install time.

The stubs are never committed (.gitignore); `pip install .` and `pip install -e .` both run this hook, so the code
always matches the contract in proto/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


def generate_stubs(root: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) over every .proto under proto/; returns the generated files."""
    from grpc_tools import protoc  # a build requirement (pyproject [build-system])
    import grpc_tools

    proto_root = root / "proto"
    protos = sorted(str(p.relative_to(proto_root)) for p in proto_root.rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"  # well-known types
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{include}",
        f"--python_out={root}",
        f"--pyi_out={root}",
        f"--grpc_python_out={root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {protos}")
    out = []
    for proto in protos:
        package_dir = root / Path(proto).parent
        (package_dir / "__init__.py").touch()
        out.extend(package_dir.glob(Path(proto).stem + "_pb2*.py*"))
    return out


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name not in ("wheel", "editable"):
            return
        generate_stubs(Path(self.root))
