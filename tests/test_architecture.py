"""The import graph keeps the architecture's layering (docs/architecture.md), checked from the
source with ``ast`` (nothing is imported): every ``import`` counts, at module level or inside a
function, since a lazy import is a dependency all the same.

Rules:
- no import cycle between kvstore's packages (kvstore.core, kvstore.store, kvstore.tiers, ...);
- kvstore.tiers never imports kvstore.store or kvstore.daemon (tiers are handed the block table
  and their collaborators by the composition root, kvstore.daemon.server);
- kvstore.store never imports kvstore.daemon;
- the servicer (kvstore.daemon.service) imports no tier (kvstore.tiers.*): it translates
  messages and calls the read and write paths (kvstore.store.reads, kvstore.store.writes),
  which orchestrate the tiers the composition root hands them; nor does it reach them through
  an attribute (no ``.ssd``, ``.remote``, ``.prefetcher`` in its source);
- the remote tier (kvstore.tiers.remote) is never handed the store: its code names neither
  ``BlockStore`` nor kvstore.store (no import, lazy or not, no such name as a string), and no
  parameter or attribute of it is called ``store`` — it gets the narrow
  kvstore.tiers.remote.slots.FillSlots;
- the SSD tier's on-disk format (kvstore.tiers.ssd.format) imports only kvstore.core: the format
  is read without the files, the allocator or the I/O;
- kvstore.core imports only the standard library, numpy, kvstore.v1 and kvstore.core;
- the SDK (kvstore.client, kvstore.kernels) imports from the daemon side only kvstore.core,
  kvstore.v1 and the planner's pure decision modules (kvstore.planner.recompute,
  kvstore.planner.prefix_load);
- each tier is the only writer of its slot allocator and its counters: outside a tier's own
  modules, no code calls a slot allocator's mutating methods (``<x>.slabs.allocate/free/
  set_owner/...``), names one of them (a bound method handed on is a write all the same), or
  assigns to or calls a method of ``<x>.counters`` — unless ``<x>`` is ``self`` itself (an
  object's own counters). An expression naming a tier (``dram``, ``ssd``, ``hbm``,
  ``remote``) belongs to that tier's modules only. Everyone else asks the tier
  (kvstore.tiers.dram.DRAMTier's methods);
- the SSD tier never hands out, frees or evicts DRAM slots: it calls none of DRAMTier's
  slot-changing methods (it reads into the kvstore.tiers.dram.PromotionSlots it is handed).

The command line (kvstore.daemon.cli, kvstore.__main__) is the top of the graph: it imports the
daemon, the SDK and the benchmarks, and nothing imports it, so it is left out of the package
cycle check (it counts as its own entry-point node).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# source folder -> the package name it is installed as (pyproject's package-dir)
SOURCES = {"kvstore": "kvstore", "client": "kvstore.client", "kernels": "kvstore.kernels"}
SDK = ("kvstore.client", "kvstore.kernels")
SDK_MAY_IMPORT = ("kvstore.core", "kvstore.v1", "kvstore.planner.recompute",
                  "kvstore.planner.prefix_load")
ENTRY_POINTS = {"kvstore.daemon.cli", "kvstore.__main__"}
SERVICER = "kvstore.daemon.service"


def _modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package's __init__)."""
    out = {}
    for folder, pkg in SOURCES.items():
        base = ROOT / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("").parts
            if any(p.startswith(".") or p in ("tests",) for p in rel):
                continue
            is_init = rel[-1] == "__init__"
            parts = rel[:-1] if is_init else rel
            name = ".".join((pkg, *parts))
            if folder == "kvstore" and parts[:1] in (("client",), ("kernels",)):
                continue    # not there: the SDK lives in client/ and kernels/
            out[name] = (path, is_init)
    return out


def _imports(name: str, path: Path, is_init: bool) -> set[str]:
    """Absolute names of the kvstore modules (or packages) this module imports."""
    tree = ast.parse(path.read_text(), str(path))
    here = name if is_init else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            # "from kvstore.core import keys" imports the module kvstore.core.keys
            found.update(f"{mod}.{a.name}" for a in node.names)
    return found


def _store_references(path: Path) -> list[str]:
    """Where a module reaches for the store: the name ``BlockStore`` (identifier, attribute, or
    a string such as getattr's), the module kvstore.store (import, or a string such as
    importlib's), or a parameter or attribute called ``store``. Prose in docstrings is not
    code and is not matched (only whole strings that are such a name)."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Name) and node.id == "BlockStore":
            found.append(f"{where} names BlockStore")
        elif isinstance(node, ast.Attribute) and node.attr in ("BlockStore", "store"):
            found.append(f"{where} uses an attribute .{node.attr}")
        elif isinstance(node, ast.arg) and node.arg == "store":
            found.append(f"{where} takes a parameter 'store'")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                node.value == "BlockStore" or _under(node.value, "kvstore.store")):
            found.append(f"{where} names {node.value!r} (importlib, getattr)")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            if any(n == "BlockStore" or _under(n, "kvstore.store") for n in names):
                found.append(f"{where} imports the store")
    return found


def remote_tier_violations(mods, refs=_store_references) -> list[str]:
    """The remote tier never gets the store (see the module docstring)."""
    out = []
    for mod, (path, _) in sorted(mods.items()):
        if _under(mod, "kvstore.tiers.remote"):
            out += [f"{mod}: {r} (the remote tier gets FillSlots, never the store)"
                    for r in refs(path)]
    return out


def _graph():
    mods = _modules()
    return mods, {m: _imports(m, p, i) for m, (p, i) in mods.items()}


def _package(mod: str) -> str:
    """The kvstore package a module belongs to: kvstore.<first part> (kvstore for top level);
    an entry point is a node of its own."""
    if mod in ENTRY_POINTS:
        return mod
    parts = mod.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def _is_kvstore(name: str) -> bool:
    return name == "kvstore" or name.startswith("kvstore.")


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(mods, graph) -> list[str]:
    known = set(mods)
    out = []
    for mod, imports in sorted(graph.items()):
        # only names that are modules or packages of ours (not "from x import some_function")
        deps = {i for i in imports if _is_kvstore(i) and i in known}
        third_party = {i.split(".")[0] for i in imports if not _is_kvstore(i) and i}
        if _under(mod, "kvstore.tiers"):
            out += [f"{mod} imports {d} (tiers never import the store or the daemon)"
                    for d in deps if _under(d, "kvstore.store") or _under(d, "kvstore.daemon")]
        if _under(mod, "kvstore.store"):
            out += [f"{mod} imports {d} (the store never imports the daemon)"
                    for d in deps if _under(d, "kvstore.daemon")]
        if mod == SERVICER:
            out += [f"{mod} imports {d} (the servicer imports no tier)"
                    for d in deps if _under(d, "kvstore.tiers")]
        if mod == "kvstore.tiers.ssd.format":
            out += [f"{mod} imports {d} (the on-disk format imports only kvstore.core)"
                    for d in deps if d != "kvstore" and not _under(d, "kvstore.core")]
        out += [f"{mod} imports the entry point {d} (nothing does)"
                for d in deps if d in ENTRY_POINTS and mod not in ENTRY_POINTS]
        if _under(mod, "kvstore.core"):
            out += [f"{mod} imports {d} (kvstore.core imports only itself and kvstore.v1)"
                    for d in deps if not (_under(d, "kvstore.core") or _under(d, "kvstore.v1"))
                    and d != "kvstore"]
            out += [f"{mod} imports {t} (kvstore.core: only the standard library and numpy)"
                    for t in third_party
                    if t not in sys.stdlib_module_names and t not in ("numpy", "__future__")]
        if any(_under(mod, s) for s in SDK):
            out += [f"{mod} imports {d} (the SDK may import from the daemon side only "
                    f"{', '.join(SDK_MAY_IMPORT)})"
                    for d in deps if d != "kvstore" and not any(_under(d, s) for s in SDK)
                    and not any(_under(d, a) for a in SDK_MAY_IMPORT)]
    # cycles between packages
    edges: dict[str, set[str]] = {}
    for mod, imports in graph.items():
        src = _package(mod)
        for d in imports:
            if _is_kvstore(d) and d in known and _package(d) != src and _package(d) != "kvstore":
                edges.setdefault(src, set()).add(_package(d))
    out += [f"import cycle between packages: {' -> '.join(c)}" for c in _cycles(edges)]
    return out


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one package (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return [c + [c[0]] for c in comps]


# -- who writes a tier's slots and counters -------------------------------------------------------
# The slot allocators' mutating methods (kvstore.tiers.dram.SlabAllocator, the SSD tier's
# SlabFiles, the HBM pool's slabs).
SLAB_MUTATORS = {"allocate", "free", "set_owner", "grow", "release_empty_spans", "mark_ready",
                 "size_class", "reserve_slots"}
# An attribute or variable of one of these names is that tier (or a part of it); the value is
# the package prefix of the modules that own it.
TIER_OWNERS = {"dram": "kvstore.tiers.dram", "ssd": "kvstore.tiers.ssd",
               "hbm": "kvstore.tiers.hbm", "remote": "kvstore.tiers.remote"}


def _chain(node) -> list[str] | None:
    """The names of an attribute chain, root first (``self.dram.slabs`` -> [self, dram,
    slabs]); None when it is rooted in something else than a name (a call, a subscript)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return parts[::-1]


def _state_writes(tree) -> list[tuple[int, list[str], str]]:
    """(line, owner chain, what) for each write of a slot allocator or of counters: a call to
    (or a reference of) ``<owner>.slabs.<mutator>``, an assignment or augmented assignment to
    ``<owner>.counters.<field>``, a call of ``<owner>.counters.<method>``."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            ch = _chain(node)
            if ch and len(ch) >= 2 and ch[-2] == "slabs" and ch[-1] in SLAB_MUTATORS:
                out.append((node.lineno, ch[:-2] + ["slabs"], ".".join(ch)))
        targets = []
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        elif isinstance(node, ast.Call):
            targets = [node.func]
        for t in targets:
            ch = _chain(t)
            if ch and len(ch) >= 3 and ch[-2] == "counters":
                out.append((t.lineno, ch[:-2], ".".join(ch)))
    return out


# DRAMTier's methods that change which slot holds what (the store's to call, not the SSD tier's)
DRAM_SLOT_METHODS = {"take_slots", "assign", "slots_for", "free_slot", "quarantine",
                     "free_quarantined", "make_room", "evict", "mark_ready", "promoted",
                     "promotion_slots"}


def _dram_slot_calls(tree) -> list[tuple[int, str]]:
    """(line, expression) for each use of ``<...>.dram.<slot-changing method>``."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in DRAM_SLOT_METHODS:
            ch = _chain(node)
            if ch and len(ch) >= 2 and ch[-2] == "dram":
                out.append((node.lineno, ".".join(ch)))
    return out


def _may_write(mod: str, owner: list[str]) -> bool:
    named = [TIER_OWNERS[p] for p in owner if p in TIER_OWNERS]
    if named:      # a tier's state: its own modules only
        return all(_under(mod, t) for t in named)
    # an object's own (``self.counters``); inside the tiers package also a tier's part held in a
    # local (``slabs.grow`` in kvstore.tiers.dram.make_room)
    return owner == ["self"] or _under(mod, "kvstore.tiers")


def ownership_violations(mods, sources: dict[str, str] | None = None) -> list[str]:
    """Writes of a tier's slot allocator or counters outside the tier's own modules.
    ``sources``: module -> source text to check instead of the file (the test's injections)."""
    out = []
    for mod, (path, _) in sorted(mods.items()):
        text = (sources or {}).get(mod)
        tree = ast.parse(text if text is not None else path.read_text(), str(path))
        for line, owner, what in _state_writes(tree):
            if not _may_write(mod, owner):
                out.append(f"{mod}:{line} writes {what} (only the tier that owns it may; "
                           "ask the tier)")
        if _under(mod, "kvstore.tiers.ssd"):
            out += [f"{mod}:{line} calls {what} (the SSD tier changes no DRAM slot: it reads "
                    "into the PromotionSlots it is handed)" for line, what in
                    _dram_slot_calls(tree)]
    return out


def test_only_a_tier_writes_its_slots_and_counters():
    mods = _modules()
    assert ownership_violations(mods) == []


def test_the_ownership_rule_can_fail():
    """Each kind of write outside the owner is reported (and the tiers' own writes are not)."""
    mods = _modules()
    inject = {
        "kvstore.store.blockstore": "def f(self, off):\n    self.dram.slabs.free(off)\n"
                                    "    self.dram.counters.evictions += 1\n"
                                    "    self.ssd.counters.count_get(1, 0, 0)\n",
        "kvstore.tiers.ssd.tier": "def f(self, off):\n    self.dram.slabs.free(off)\n"
                                  "    self.dram.free_slot(off)\n",
        "kvstore.daemon.server": "def f(dram, loop):\n"
                                 "    loop.call_soon(dram.slabs.mark_ready, 0)\n",
        "kvstore.prefetch.prefetcher": "def f(store):\n    store.counters.lookups = 0\n",
    }
    found = "\n".join(ownership_violations(mods, inject))
    for expect in ("kvstore.store.blockstore:2 writes self.dram.slabs.free",
                   "kvstore.store.blockstore:3 writes self.dram.counters.evictions",
                   "kvstore.store.blockstore:4 writes self.ssd.counters.count_get",
                   "kvstore.tiers.ssd.tier:2 writes self.dram.slabs.free",
                   "kvstore.tiers.ssd.tier:3 calls self.dram.free_slot",
                   "kvstore.daemon.server:2 writes dram.slabs.mark_ready",
                   "kvstore.prefetch.prefetcher:2 writes store.counters.lookups"):
        assert expect in found, found
    own = {"kvstore.tiers.dram": "def f(self, off):\n    self.slabs.free(off)\n"
                                 "    self.counters.evictions += 1\n",
           "kvstore.tiers.ssd.catalog": "def f(self, ssd):\n    ssd.counters.reads = 0\n"}
    assert ownership_violations({m: mods[m] for m in own}, own) == []


def test_the_import_graph_keeps_the_layering():
    mods, graph = _graph()
    assert "kvstore.store.blockstore" in mods and "kvstore.client" in mods   # the walk works
    assert violations(mods, graph) == []


def test_the_remote_tier_never_gets_the_store():
    mods = _modules()
    assert "kvstore.tiers.remote.tier" in mods and "kvstore.tiers.remote.fills" in mods
    assert remote_tier_violations(mods) == []


def test_the_remote_tier_rule_catches_each_way_to_the_store(tmp_path):
    """The rule can fail: each way of handing the remote tier the store is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from kvstore.store.blockstore import BlockStore\n"
        "import importlib\n"
        "class Tier:\n"
        "    \"\"\"Prose may say BlockStore; it is no dependency.\"\"\"\n"
        "    def __init__(self, store, other):\n"
        "        self.store = store\n"
        "        self.x = other.BlockStore\n"
        "        self.m = importlib.import_module('kvstore.store.table')\n"
        "        self.t: BlockStore = None\n")
    found = "\n".join(_store_references(bad))
    for expect in ("bad.py:1 imports the store", "bad.py:5 takes a parameter 'store'",
                   "bad.py:6 uses an attribute .store", "bad.py:7 uses an attribute .BlockStore",
                   "bad.py:8 names 'kvstore.store.table'", "bad.py:9 names BlockStore"):
        assert expect in found, found
    assert "bad.py:4" not in found
    mods = {"kvstore.tiers.remote.bad": (bad, False), "kvstore.tiers.ssd.bad": (bad, False)}
    reported = remote_tier_violations(mods)
    assert reported and all(r.startswith("kvstore.tiers.remote.bad: ") for r in reported)


def test_the_checker_catches_each_kind_of_violation():
    """The rules can fail: each injected edge is reported."""
    mods, graph = _graph()
    bad = {k: set(v) for k, v in graph.items()}
    bad["kvstore.tiers.dram"].add("kvstore.store.blockstore")        # a tier imports the store
    bad["kvstore.store.table"].add("kvstore.daemon.server")          # the store imports the daemon
    bad["kvstore.core.keys"].add("kvstore.metrics.counters")         # core imports a daemon part
    bad["kvstore.core.keys"].add("grpc")                             # core imports grpc
    bad["kvstore.client"].add("kvstore.store.table")                 # the SDK imports the store
    bad["kvstore.tiers.ssd.format"].add("kvstore.tiers.ssd.files")   # the format imports the I/O
    bad["kvstore.metrics.counters"].add("kvstore.access.interceptor")   # access <-> metrics
    bad[SERVICER].add("kvstore.tiers.remote.tier")                   # the servicer drives a tier
    found = "\n".join(violations(mods, bad))
    for expect in ("kvstore.tiers.dram imports kvstore.store.blockstore",
                   "kvstore.store.table imports kvstore.daemon.server",
                   "kvstore.core.keys imports kvstore.metrics.counters",
                   "kvstore.core.keys imports grpc",
                   "kvstore.client imports kvstore.store.table",
                   "kvstore.tiers.ssd.format imports kvstore.tiers.ssd.files",
                   "kvstore.daemon.service imports kvstore.tiers.remote.tier",
                   "import cycle between packages"):
        assert expect in found, found


# What the read and write paths orchestrate: a servicer that names one drives a tier itself.
ORCHESTRATED = ("ssd", "remote", "prefetcher")


def tier_attributes(source: str) -> list[str]:
    """The attributes in ``source`` that name a tier or the prefetcher, as 'line:name'."""
    return [f"{n.lineno}:{n.attr}" for n in ast.walk(ast.parse(source))
            if isinstance(n, ast.Attribute) and n.attr in ORCHESTRATED]


def test_the_servicer_drives_no_tier():
    """RPC handlers decode, call the read or write path, encode: the orchestration of the
    tiers (remote probe and fill, promotion, after-get and after-commit observers) lives in
    kvstore.store.reads and kvstore.store.writes."""
    source = (ROOT / "kvstore" / "daemon" / "service.py").read_text()
    assert tier_attributes(source) == []
    # the check can fail: a handler that calls a tier is caught
    assert tier_attributes(source + "\nself.store.ssd.on_hits(bids)\n") != []


def test_every_package_is_in_the_distribution():
    """pyproject lists its packages by hand (kvstore.client and kvstore.kernels live in other
    folders): a new subpackage missing from the list installs nowhere but in this checkout."""
    import tomllib
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    found = set()
    for name, folder in tool["package-dir"].items():
        root = ROOT / folder
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root)
            found.add(".".join((name, *rel.parts)) if rel.parts else name)
    assert found - listed == set(), f"add to [tool.setuptools] packages: {sorted(found - listed)}"
