"""The project the rootdir belongs to, and its import packages: what `--ftrace` hooks by default
besides the files under the rootdir, wherever those packages are imported from (an installed,
non-editable copy in site-packages included).

The project is read statically, from the nearest `pyproject.toml`, `setup.cfg` or `setup.py` at
or above the rootdir (the search stops at a repository root, a directory with `.git` or `.hg`):

- pyproject.toml: `[project] name`; the packages declared for setuptools (`packages`, `py-modules`,
  `packages.find`, `package-dir`), hatch (`[tool.hatch.build.targets.wheel] packages`), maturin
  (`module-name`, `python-source`, `python-packages`), poetry (`packages`, `name`) and flit
  (`[tool.flit.module] name`);
- setup.cfg: `[metadata] name` and `[options]` packages, py_modules, package_dir,
  `[options.packages.find]`;
- setup.py: the literal keyword arguments of its `setup(...)` call (name, packages, py_modules,
  package_dir, `find_packages(...)`), read with `ast`: setup.py is never executed.

Where nothing declares the packages, the layout is looked at: the packages of a `src/` directory,
else a package or module of the project's name; and last, the installed distribution of that
name (its `top_level.txt` or `RECORD`), or a module of the project's name that can be imported
(an editable install). Only the top-level names are kept: a package is hooked
with all its submodules.

Imported only by `--ftrace` sessions (ftrace.py), once per session.

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import ast  # pytest has it loaded already (assertion rewriting)
import fnmatch
import os
import re

PROJECT_FILES = ("pyproject.toml", "setup.cfg", "setup.py")
# Directories of a flat layout that are not the project's import packages.
NOT_PACKAGES = frozenset(
    {
        "tests",
        "test",
        "testing",
        "docs",
        "doc",
        "examples",
        "example",
        "benchmarks",
        "benches",
        "bench",
        "scripts",
        "tools",
        "build",
        "dist",
        "site-packages",
    }
)
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Project:
    """A distribution: its name, top-level import packages, and the file they were read from."""

    __slots__ = ("name", "packages", "source")

    def __init__(self, name: str | None, packages: tuple[str, ...], source: str):
        self.name = name
        self.packages = packages
        self.source = source

    def __repr__(self) -> str:
        return f"Project({self.name!r}, {self.packages!r}, {self.source!r})"


def find_project(rootdir: str) -> Project | None:
    """The project at or above `rootdir` (None: none found, or nothing in it names one)."""
    directory = os.path.abspath(str(rootdir))
    while True:
        try:
            project = read_project(directory)
        except Exception:  # an unreadable file must not stop the session: no project
            project = None
        if project is not None:
            return project
        if any(os.path.exists(os.path.join(directory, mark)) for mark in (".git", ".hg")):
            return None
        parent = os.path.dirname(directory)
        if parent == directory:
            return None
        directory = parent


def read_project(directory: str) -> Project | None:
    """The project whose files are in `directory`, or None. The name comes from the first file
    that gives one, the packages from the first that declares some (a pyproject.toml with the
    name and a setup.py with the packages is common)."""
    name = None
    packages: list[str] = []
    source = None
    for filename, reader in (
        ("pyproject.toml", _from_pyproject),
        ("setup.cfg", _from_setup_cfg),
        ("setup.py", _from_setup_py),
    ):
        path = os.path.join(directory, filename)
        if not os.path.isfile(path):
            continue
        try:
            found = reader(path, directory)
        except Exception:  # a file we cannot read statically: try the next one
            found = None
        if found is None:
            continue
        source = source or path
        name = name or found[0]
        if not packages:
            packages = found[1]
        if name and packages:
            break
    if source is None:
        return None
    if not packages and name:
        packages = _from_layout(directory, name) or _from_installed(name) or _importable(name)
    kept = tuple(sorted({p for p in packages if _IDENTIFIER.match(p)}))
    if not name and not kept:
        return None
    return Project(name, kept, source)


def normalized(name: str) -> str:
    """A distribution name as an import name: `my-lib.x` -> `my_lib_x`."""
    return re.sub(r"[-_.]+", "_", name).lower()


def _top(names) -> list[str]:
    out = []
    for name in names:
        if isinstance(name, str) and name:
            base = name.replace("\\", "/").rstrip("/").split("/")[-1]
            base = base[:-3] if base.endswith(".py") else base
            out.append(base.split(".")[0])
    return out


def _discover(base: str, where, include=(), exclude=(), namespace: bool = False) -> list[str]:
    """Top-level packages (and modules) under `base`/`where`, as setuptools' find would list."""
    found = []
    for sub in where or ["."]:
        directory = os.path.normpath(os.path.join(base, str(sub)))
        try:
            entries = os.listdir(directory)
        except OSError:
            continue
        for entry in entries:
            path = os.path.join(directory, entry)
            if entry.startswith((".", "_")) and entry != "__init__.py":
                continue
            if os.path.isdir(path):
                if not _IDENTIFIER.match(entry):
                    continue
                if os.path.isfile(os.path.join(path, "__init__.py")) or (
                    namespace and any(f.endswith(".py") for f in _listing(path))
                ):
                    found.append(entry)
        found = [name for name in found if not _excluded(name, include, exclude)]
    return found


def _listing(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _excluded(name: str, include, exclude) -> bool:
    if any(fnmatch.fnmatchcase(name, str(p)) for p in exclude or ()):
        return True
    if include:
        return not any(
            fnmatch.fnmatchcase(name, str(p)) or str(p).startswith(name + ".") for p in include
        )
    return False


def _from_pyproject(path: str, directory: str):
    import tomllib

    with open(path, "rb") as f:
        data = tomllib.load(f)
    tool = data.get("tool") or {}
    project = data.get("project") or {}
    poetry = tool.get("poetry") or {}
    flit = tool.get("flit") or {}
    name = project.get("name") or poetry.get("name")
    packages: list[str] = []
    # setuptools
    st = tool.get("setuptools") or {}
    package_dir = st.get("package-dir") or {}
    base = os.path.join(directory, str(package_dir.get("", "."))) if package_dir else directory
    declared = st.get("packages")
    if isinstance(declared, list):
        packages += _top(declared)
    elif isinstance(declared, dict) and isinstance(declared.get("find"), dict):
        find = declared["find"]
        packages += _discover(
            directory,
            find.get("where") or ([package_dir[""]] if "" in package_dir else None),
            find.get("include") or (),
            find.get("exclude") or (),
            namespace=find.get("namespaces", True),
        )
    packages += _top(st.get("py-modules") or ())
    if not packages and package_dir.get(""):
        packages += _discover(base, None)
    # hatch
    hatch = ((tool.get("hatch") or {}).get("build")) or {}
    wheel = ((hatch.get("targets") or {}).get("wheel")) or {}
    packages += _top(wheel.get("packages") or hatch.get("packages") or ())
    # maturin: module-name is "pkg" or "pkg._native"; python-source holds the Python packages
    maturin = tool.get("maturin") or {}
    if maturin:
        packages += _top([maturin.get("module-name") or ""])
        packages += _top(maturin.get("python-packages") or ())
        source = maturin.get("python-source")
        if source and not maturin.get("module-name"):
            packages += _discover(directory, [source])
    # poetry
    for entry in poetry.get("packages") or ():
        if isinstance(entry, dict) and isinstance(entry.get("include"), str):
            packages += _top([entry["include"].split("*")[0] or ""])
    # flit
    module = (flit.get("module") or {}).get("name")
    packages += _top([module] if module else ())
    if not name and not packages and not (flit.get("metadata") or {}).get("module"):
        return None
    if not name:
        name = (flit.get("metadata") or {}).get("module")
        packages += _top([name] if name else ())
    return name if isinstance(name, str) else None, packages


def _from_setup_cfg(path: str, directory: str):
    import configparser

    parser = configparser.ConfigParser(interpolation=None)
    parser.read(path, encoding="utf-8")
    name = parser.get("metadata", "name", fallback=None)
    raw = parser.get("options", "packages", fallback="").strip()
    package_dir = _cfg_dict(parser.get("options", "package_dir", fallback=""))
    packages: list[str] = []
    if raw.startswith(("find:", "find_namespace:")):
        section = "options.packages.find"
        where = parser.get(section, "where", fallback="").split() or (
            [package_dir[""]] if "" in package_dir else None
        )
        packages += _discover(
            directory,
            where,
            _cfg_list(parser.get(section, "include", fallback="")),
            _cfg_list(parser.get(section, "exclude", fallback="")),
            namespace=raw.startswith("find_namespace:"),
        )
    else:
        packages += _top(_cfg_list(raw))
    packages += _top(_cfg_list(parser.get("options", "py_modules", fallback="")))
    if not name and not packages:
        return None
    return name, packages


def _cfg_list(raw: str) -> list[str]:
    return [part.strip() for part in re.split(r"[,\n]", raw or "") if part.strip()]


def _cfg_dict(raw: str) -> dict[str, str]:
    out = {}
    for line in _cfg_list(raw):
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def _from_setup_py(path: str, directory: str):
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    call = None
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _call_name(node) == "setup":
            call = node
            break
    if call is None:
        return None
    kwargs = {k.arg: k.value for k in call.keywords if k.arg}
    name = _literal(kwargs.get("name"))
    package_dir = _literal(kwargs.get("package_dir"))
    package_dir = package_dir if isinstance(package_dir, dict) else {}
    packages: list[str] = []
    value = kwargs.get("packages")
    literal = _literal(value)
    if isinstance(literal, (list, tuple)):
        packages += _top(literal)
    elif isinstance(value, ast.Call) and _call_name(value) in (
        "find_packages",
        "find_namespace_packages",
    ):
        args = {k.arg: _literal(k.value) for k in value.keywords if k.arg}
        where = args.get("where", _literal(value.args[0]) if value.args else None)
        if where is None and "" in package_dir:
            where = package_dir[""]
        packages += _discover(
            directory,
            [where] if isinstance(where, str) else None,
            args.get("include") or (),
            args.get("exclude") or (),
            namespace=_call_name(value) == "find_namespace_packages",
        )
    modules = _literal(kwargs.get("py_modules"))
    if isinstance(modules, (list, tuple)):
        packages += _top(modules)
    if not isinstance(name, str):
        name = None
    if not name and not packages:
        return None
    return name, packages


def _call_name(node) -> str | None:
    func = node.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _literal(node):
    if node is None:
        return None
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def _from_layout(directory: str, name: str) -> list[str]:
    """No declared packages: those of `src/`, else the package or module of the project's name,
    else the flat layout's packages."""
    src = os.path.join(directory, "src")
    if os.path.isdir(src):
        found = _discover(src, None, namespace=True)
        found += [f[:-3] for f in _listing(src) if f.endswith(".py") and _IDENTIFIER.match(f[:-3])]
        if found:
            return found
    own = normalized(name)
    if os.path.isfile(os.path.join(directory, own, "__init__.py")) or os.path.isfile(
        os.path.join(directory, own + ".py")
    ):
        return [own]
    return [p for p in _discover(directory, None) if p.lower() not in NOT_PACKAGES]


def _from_installed(name: str) -> list[str]:
    """The top-level names the installed distribution `name` provides (none when it is not)."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution(name)
    except Exception:
        return []
    text = dist.read_text("top_level.txt")
    if text:
        return [line.strip() for line in text.splitlines() if line.strip()]
    found = []
    for file in dist.files or ():
        parts = file.parts
        if not parts or parts[0].endswith((".dist-info", ".egg-info", ".data")) or parts[0] == "..":
            continue
        if len(parts) == 1:
            if parts[0].endswith(".py"):
                found.append(parts[0][:-3])
        else:
            found.append(parts[0])
    return found


def _importable(name: str) -> list[str]:
    """The import name of the project's name, where a module of that name can be found."""
    own = normalized(name)
    return [own] if _IDENTIFIER.match(own) and where_imported(own) is not None else []


def where_imported(package: str) -> str | None:
    """Where `package` would be imported from now (its directory or file), or None. Finds the
    module spec without importing anything."""
    import importlib.util
    import sys

    module = sys.modules.get(package)
    spec = getattr(module, "__spec__", None)
    try:
        if spec is None:
            spec = importlib.util.find_spec(package)
    except Exception:
        return None
    if spec is None:
        return None
    locations = list(getattr(spec, "submodule_search_locations", None) or ())
    if locations:
        return str(locations[0])
    origin = getattr(spec, "origin", None)
    return origin if origin and origin not in ("built-in", "frozen") else None


def describe(rootdir, project: Project | None, include=(), exclude=()) -> str:
    """The header line that says what --ftrace hooks."""
    root = os.path.abspath(str(rootdir))
    parts = ["ftrace: hooked: the test modules and other code under the rootdir"]
    if project is None:
        parts.append("no project found (pyproject.toml, setup.cfg or setup.py)")
    else:
        source = os.path.relpath(project.source, root)
        named = project.name or "(no name)"
        if not project.packages:
            parts.append(f"project {named} ({source}): no import packages found")
        else:
            shown = [_package_text(p, root, exclude) for p in project.packages]
            parts.append(f"project {named} ({source}): {', '.join(shown)}")
    if include:
        parts.append("--ftrace-include " + " ".join(sorted(set(include))))
    if exclude:
        parts.append("--ftrace-exclude " + " ".join(sorted(set(exclude))))
    return "; ".join(parts)


def _package_text(package: str, root: str, exclude) -> str:
    from pytest_ftrace.ftrace.instrument import NEVER_MODULES

    if package in NEVER_MODULES:
        return f"{package} (never: the test machinery)"
    if any(fnmatch.fnmatchcase(package, str(p)) for p in exclude):
        return f"{package} (excluded by --ftrace-exclude)"
    where = where_imported(package)
    if where is None:
        return f"{package} (not importable yet)"
    relative = os.path.relpath(where, root)
    return f"{package} from {where if relative.startswith('..') else relative}"
