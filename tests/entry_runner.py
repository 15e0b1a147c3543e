"""Run ``train/<script>.py`` as ``python train/<script>.py`` would, without paying its imports each time.

Every entry point spends about 5 s importing torch, tensordict (which pulls ``torch._dynamo``),
torchrl, transformers and Hydra before it does anything; the suite starts dozens of them. Here a
fork server (``multiprocessing``'s ``forkserver``) imports those libraries once (:mod:`entry_preload`)
and each run is a child forked from it: a new process with its own pid, environment, working
directory, ``sys.argv`` and file descriptors 1 / 2, which runs the script as ``__main__`` and exits
with the script's exit status (``SystemExit`` code; 1 and the traceback on stderr for an uncaught
exception; ``atexit`` handlers the run registered are run). The server never runs a torch op, so no
OpenMP thread pool exists when it forks.

What a forked run cannot mirror: environment variables read while those libraries load. The server
sets what every entry point sets before torch loads (``pipeline/threads.omp_wait_defaults``), and a
run whose environment asks for other OpenMP wait variables falls back to a real subprocess
(:func:`run_script`), as does everything when ``GDPO_TEST_SUBPROCESS=1`` is exported.
"""
from __future__ import annotations

import atexit
import importlib.util
import multiprocessing as mp
import os
import runpy
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

_CTX = None


def _context():
    """The forkserver context, its server started with :mod:`entry_preload` imported."""
    global _CTX
    if _CTX is None:
        from multiprocessing import forkserver

        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["entry_preload"])
        # the server is a fresh interpreter that does not get this process' sys.path: it finds the
        # preload module (beside this file) through PYTHONPATH, or silently preloads nothing
        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parent), old) if p)
        try:
            forkserver.ensure_running()
        finally:
            if old is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = old
        _CTX = ctx
    return _CTX


def _child(script: str, args: list[str], cwd: str, env: dict[str, str], out_path: str, err_path: str) -> None:
    """In the forked child: become ``python script *args`` run in ``cwd`` with ``env``, then exit."""
    for fd, path in ((1, out_path), (2, err_path)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", closefd=False)
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", closefd=False)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv = [script, *args]
    sys.path[0] = str(Path(script).parent)  # as the interpreter sets it for a script
    atexit._clear()  # handlers inherited from the server are not this run's
    mp.set_start_method(None, force=True)  # the run's own pools start processes the platform's default way
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:  # sys.exit("message"): printed to stderr, status 1
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _forkable(env: dict[str, str]) -> bool:
    if os.environ.get("GDPO_TEST_SUBPROCESS") == "1":
        return False
    from gdpo_listener.pipeline.threads import OMP_WAIT_VARS, omp_wait_defaults

    server = {**{k: v for k, v in os.environ.items() if k in OMP_WAIT_VARS}, **omp_wait_defaults()}
    return {k: v for k, v in env.items() if k in OMP_WAIT_VARS} in ({}, server)


def run_script(script: Path, args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``subprocess.run([python, script, *args], cwd=cwd, env=env, capture_output=True, text=True,
    timeout=timeout)``, in a child forked from the preloaded server when it can (module docstring)."""
    cmd = [sys.executable, str(script), *args]
    if not _forkable(env):
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    with tempfile.TemporaryDirectory(prefix="entry_run_") as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        p = _context().Process(target=_child, args=(str(script), list(args), str(cwd), dict(env), out, err))
        p.start()
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join()
            raise subprocess.TimeoutExpired(cmd, timeout)
        read = lambda path: Path(path).read_text(encoding="utf-8", errors="replace") if os.path.exists(path) else ""  # noqa: E731
        return subprocess.CompletedProcess(cmd, p.exitcode, read(out), read(err))


def load_script(name: str):
    """``train/<name>.py`` imported as a module (the entry points are scripts, not package modules), for the
    functions it defines; its ``main`` is not run."""
    path = Path(__file__).resolve().parents[1] / "train" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"train_script_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
