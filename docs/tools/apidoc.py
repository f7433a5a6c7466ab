#!/usr/bin/env python3
"""docs/api.md: the reference part generated from protos/, the examples part run live.

    apidoc.py generate IMAGE   rewrite the generated part of docs/api.md
    apidoc.py check IMAGE      fail when that part is stale (CI)
    apidoc.py examples IMAGE   run every ```sh example of docs/api.md against a
                               live server (started here, stopped with SIGTERM);
                               IMAGE says which RPCs each need one

IMAGE is `buf build --exclude-imports -o IMAGE.binpb` of protos/ (a
FileDescriptorSet with comments); `make docs-api` / `make check-docs-api` /
`make docs-api-examples` pass it. Everything above the marker line in
docs/api.md is written by hand; everything below it is generated.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2

REPO = Path(__file__).resolve().parents[2]
API_MD = REPO / "docs" / "api.md"
MARKER = "<!-- Generated from protos/ by `make docs-api`: edit the .proto comments, not the text below. -->"
F = descriptor_pb2.FieldDescriptorProto
SCALARS = {
    F.TYPE_DOUBLE: "double", F.TYPE_FLOAT: "float", F.TYPE_INT64: "int64", F.TYPE_UINT64: "uint64",
    F.TYPE_INT32: "int32", F.TYPE_FIXED64: "fixed64", F.TYPE_FIXED32: "fixed32", F.TYPE_BOOL: "bool",
    F.TYPE_STRING: "string", F.TYPE_BYTES: "bytes", F.TYPE_UINT32: "uint32", F.TYPE_SFIXED32: "sfixed32",
    F.TYPE_SFIXED64: "sfixed64", F.TYPE_SINT32: "sint32", F.TYPE_SINT64: "sint64",
}
WKT_LINKS = {
    ".google.protobuf.Timestamp": "https://protobuf.dev/reference/protobuf/google.protobuf/#timestamp",
}


def comments(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    out = {}
    for loc in file.source_code_info.location:
        text = loc.leading_comments.strip("\n")
        if text:
            lines = [line[1:] if line.startswith(" ") else line for line in text.split("\n")]
            out[tuple(loc.path)] = "\n".join(lines).strip()
    return out


def anchor(full_name: str) -> str:
    return full_name.lstrip(".").replace(".", "").lower()


def type_link(name: str, local: set[str]) -> str:
    if name in local:
        return f"[`{name.rsplit('.', 1)[1]}`](#{anchor(name)})"
    if name in WKT_LINKS:
        return f"[`{name.lstrip('.')}`]({WKT_LINKS[name]})"
    return f"`{name.lstrip('.')}`"


def one_line(text: str) -> str:
    """A comment as one table cell: paragraphs joined, pipes escaped."""
    return re.sub(r"\s*\n\s*", " ", text).replace("|", "\\|") or "—"


def render(image: Path) -> str:
    fds = descriptor_pb2.FileDescriptorSet.FromString(image.read_bytes())
    files = sorted((f for f in fds.file if f.package.startswith("halflife.")), key=lambda f: f.name)
    local: set[str] = set()
    maps: dict[str, tuple[F, F]] = {}
    for f in files:
        def walk(prefix: str, messages):
            for m in messages:
                name = f"{prefix}.{m.name}"
                if m.options.map_entry:
                    maps[name] = (m.field[0], m.field[1])
                else:
                    local.add(name)
                walk(name, m.nested_type)
                for e in m.enum_type:
                    local.add(f"{name}.{e.name}")
        walk(f".{f.package}", f.message_type)
        local.update(f".{f.package}.{e.name}" for e in f.enum_type)

    def field_type(field: F) -> str:
        if field.type_name in maps:
            key, value = maps[field.type_name]
            return f"map<{SCALARS[key.type]}, {field_type(value)}>"
        base = type_link(field.type_name, local) if field.type_name else f"`{SCALARS[field.type]}`"
        if field.label == F.LABEL_REPEATED:
            return f"repeated {base}"
        if field.proto3_optional:
            return f"optional {base}"
        return base

    out = [MARKER, "", "## Reference", ""]
    out += ["Services, then messages and enums per file, in source order. Field numbers are the wire tags; "
            "requests in JSON may use either the proto names or the lowerCamelCase JSON names (`user_id` or "
            "`userId`). grpcurl prints responses with the proto names and leaves out fields at their default value "
            "(a zero count, an empty list): `-emit-defaults` shows them.", ""]
    for f in files:
        doc = comments(f)
        for si, service in enumerate(f.service):
            full = f"{f.package}.{service.name}"
            out += [f"### {full}", "", f"_{f.name}_", "", doc.get((6, si), ""), ""]
            for mi, method in enumerate(service.method):
                out += [f"#### {service.name}.{method.name}", "",
                        f"`rpc {method.name}({method.input_type.rsplit('.', 1)[1]}) returns "
                        f"({method.output_type.rsplit('.', 1)[1]})` — request {type_link(method.input_type, local)}, "
                        f"response {type_link(method.output_type, local)}", "",
                        doc.get((6, si, 2, mi), ""), ""]
    for f in files:
        doc = comments(f)
        out += [f"### Messages and enums of {f.name}", ""]

        def message(path: tuple[int, ...], m: descriptor_pb2.DescriptorProto, prefix: str):
            if m.options.map_entry:
                return
            full = f"{prefix}.{m.name}"
            out.extend([f"#### {full.lstrip('.')}", "", doc.get(path, ""), ""])
            if m.field:
                out.extend(["| field | type | # | description |", "| --- | --- | --- | --- |"])
                for fi, field in enumerate(m.field):
                    note = doc.get(path + (2, fi), "")
                    if field.HasField("oneof_index") and not field.proto3_optional:
                        note = f"(oneof `{m.oneof_decl[field.oneof_index].name}`) {note}"
                    out.append(f"| `{field.name}` | {field_type(field)} | {field.number} | {one_line(note)} |")
                out.append("")
            else:
                out.extend(["No fields.", ""])
            for ni, nested in enumerate(m.nested_type):
                message(path + (3, ni), nested, full)
            for ei, e in enumerate(m.enum_type):
                enum(path + (4, ei), e, full)

        def enum(path: tuple[int, ...], e: descriptor_pb2.EnumDescriptorProto, prefix: str):
            out.extend([f"#### {prefix.lstrip('.')}.{e.name}", "", doc.get(path, ""), "",
                        "| value | # | description |", "| --- | --- | --- |"])
            for vi, value in enumerate(e.value):
                out.append(f"| `{value.name}` | {value.number} | {one_line(doc.get(path + (2, vi), ''))} |")
            out.append("")

        for mi, m in enumerate(f.message_type):
            message((4, mi), m, f".{f.package}")
        for ei, e in enumerate(f.enum_type):
            enum((5, ei), e, f".{f.package}")
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"


def split_doc() -> tuple[str, str]:
    text = API_MD.read_text()
    if MARKER not in text:
        sys.exit(f"{API_MD}: marker line missing:\n{MARKER}")
    head, tail = text.split(MARKER, 1)
    return head, MARKER + tail


def generate(image: Path) -> None:
    head, _ = split_doc()
    API_MD.write_text(head + render(image))
    print(f"wrote {API_MD.relative_to(REPO)}")


def check(image: Path) -> None:
    _, tail = split_doc()
    if tail != render(image):
        sys.exit(f"{API_MD.relative_to(REPO)} is stale: run 'make docs-api'")
    print(f"{API_MD.relative_to(REPO)} matches protos/")


# ----------------------------------------------------------------- examples

def rpcs(image: Path) -> set[str]:
    fds = descriptor_pb2.FileDescriptorSet.FromString(image.read_bytes())
    return {f"{f.package}.{s.name}/{m.name}" for f in fds.file if f.package.startswith("halflife.")
            for s in f.service for m in s.method}


def start_server(model_dir: Path, data_dir: Path) -> tuple[subprocess.Popen, str]:
    binary = os.environ.get("HALFLIFE_BIN", str(REPO / ".venv" / "bin" / "halflife"))
    process = subprocess.Popen(
        [binary, "serve", "--host", "127.0.0.1", "--port", "0", "--model-dir", str(model_dir),
         "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    log = []
    for line in process.stdout:
        log.append(line)
        found = re.search(r"serving on (127\.0\.0\.1:\d+)", line)
        if found:
            # Keep draining the log so the server never blocks on a full pipe.
            import threading
            threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
            return process, found.group(1)
    sys.exit("server exited before serving:\n" + "".join(log))


def examples(image: Path) -> None:
    """Runs each ```sh block of docs/api.md in order with bash -e. A block
    with a `# expect: CODE` line must fail with that gRPC code."""
    text = API_MD.read_text().split(MARKER, 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    called = set(re.findall(r"(halflife\.v1\.\w+/\w+)", "".join(blocks)))
    missing = rpcs(image) - called
    if missing:
        sys.exit(f"docs/api.md has no grpcurl example for: {', '.join(sorted(missing))}")
    model_dir = Path(os.environ.get("HALFLIFE_TEST_MODEL_DIR", "var/models/all-MiniLM-L6-v2"))
    model_dir = model_dir if model_dir.is_absolute() else REPO / model_dir
    bin_dir = REPO / ".venv" / "bin"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    with tempfile.TemporaryDirectory(prefix="halflife-apidoc-") as data_dir:
        process, address = start_server(model_dir, Path(data_dir))
        failures = 0
        try:
            for n, block in enumerate(blocks, 1):
                script = block.replace("127.0.0.1:50051", address)
                expect = re.search(r"^# expect: (\w+)", block, re.M)
                result = subprocess.run(["bash", "-eo", "pipefail", "-c", script], capture_output=True,
                                        text=True, timeout=60, env=env, cwd=REPO)
                output = result.stdout + result.stderr
                if expect:
                    ok = result.returncode != 0 and f"Code: {expect.group(1)}" in output
                else:
                    ok = result.returncode == 0 and "ERROR" not in output
                first = next((line for line in block.splitlines() if line and not line.startswith("#")), "")
                print(f"{'ok' if ok else 'FAILED'}: example {n}: {first[:90]}")
                if not ok:
                    failures += 1
                    print(f"--- script\n{script}--- output (rc {result.returncode})\n{output}---")
        finally:
            process.send_signal(signal.SIGTERM)
            code = process.wait(60)
        if code != 0:
            sys.exit(f"server exited with {code} after SIGTERM")
    print(f"examples: {len(blocks) - failures} passed, {failures} failed")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in {"generate", "check", "examples"} or len(sys.argv) != 3:
        sys.exit(__doc__)
    {"generate": generate, "check": check, "examples": examples}[sys.argv[1]](Path(sys.argv[2]))
