"""The entry points: outside a full set-up (without torchrec, the demo without a source checkout's configs), and
how a job ends (SIGTERM, a failure) as the `mmoe-rec` process."""
from __future__ import annotations

import importlib.util
import textwrap

import pytest


def test_mmoe_rec_without_torchrec_says_how_to_install_it_in_one_line(capsys, monkeypatch):
    from mmoe_rec import cli

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchrec" else find_spec(name, *a))
    assert cli.main(["score", "--model", "m", "--input", "i", "--output", "o"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: torchrec is not installed") and "pip install --no-deps torchrec==1.8.0" in err
    # the help of fit / register / score is built from classes that import torchrec: the same message (in a
    # process without torchrec it was a ModuleNotFoundError traceback)
    for job in ("fit", "register", "score"):
        assert cli.main([job, "--help"]) == 1
        assert capsys.readouterr().err.startswith("error: torchrec is not installed")
    # what does not need it still runs: the top-level help, synthetic data, the feature pipeline
    assert cli.main(["--help"]) == 0
    for job in ("synth", "features"):
        try:
            assert cli.main([job, "--help"]) == 0
        except SystemExit as e:  # the parsers' help exits 0
            assert e.code == 0
    assert "torchrec is not installed" not in capsys.readouterr().err


def test_the_demo_outside_a_checkout_stops_before_doing_anything(tmp_path, capsys, monkeypatch):
    from mmoe_rec import demo

    monkeypatch.setattr(demo, "ROOT", tmp_path / "site-packages")  # where a wheel install puts the package's parent
    assert demo.main(["--workdir", str(tmp_path / "work"), "--rows", "100"]) == 1
    assert "run it from a clone of the repository" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()  # no synthetic data written first


def test_the_pipelines_scripts_run_their_jobs():
    """pipelines/ holds thin entry points of the jobs (DESIGN.md): each runs its subcommand's parser."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for script, job in (("build_features.py", "mmoe-rec features"), ("score.py", "mmoe-rec score")):
        proc = subprocess.run([sys.executable, str(root / "pipelines" / script), "--help"], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0 and f"usage: {job}" in proc.stdout, (script, proc.stdout[:300], proc.stderr[-500:])


def _wait_for(marker, proc, seconds: float = 120) -> None:
    """Until the subprocess `proc` touches `marker` (it has reached the point to test); it must not end first."""
    import time

    deadline = time.monotonic() + seconds
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.02)


def test_a_job_stopped_by_sigterm_leaves_no_temporary_output(tmp_path):
    """`kill` / `timeout` / a scheduler's cancel send SIGTERM, on which Python dies at once by default: a features
    build stopped so left its `.<output>.tmp-<pid>` folder (106 MB in a review's run), which nothing removes later.
    Now the job ends as on an error: its cleanup runs, the exit code is 143 (128 + SIGTERM), no output is written.
    The build is held at its first batch (patched to wait), so the signal lands mid-job every time."""
    import signal
    import subprocess
    import sys

    (tmp_path / "raw.csv").write_text("city,y\n" + "".join(f"c{i % 5},{i % 2}\n" for i in range(100)))
    (tmp_path / "s.yaml").write_text("categorical: [{name: city}]\ntasks: [{name: y, column: y, type: binary}]\n")
    started = tmp_path / "started"
    script = textwrap.dedent(f"""
        import sys, time
        from mmoe_rec.features import build
        def held(*args):
            open({str(started)!r}, "w").close()
            time.sleep(120)
        build.group_by_split = held
        from mmoe_rec.cli import main
        sys.exit(main(["features", "--schema", "s.yaml", "--input", "train=raw.csv", "--output", "new/out"]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(started, proc)
        assert [p.name for p in (tmp_path / "new").iterdir() if p.name.startswith(".out.tmp-")]  # mid-write
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        err = proc.stderr.read()
    finally:
        proc.kill()
    # no temporary output, and not the folder made for it either (a review found it left empty); one line said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw.csv", "s.yaml", "started"]
    assert err.strip().splitlines()[-1] == ("error: mmoe-rec features stopped by SIGTERM before it finished; it left "
                                            "no partial output")


def test_a_sigterm_during_the_final_swap_ends_the_job_saying_its_output_is_complete(tmp_path):
    """replace_dir holds a SIGTERM until the new output is in place and the old one removed, then takes it: the
    job's line said it stopped before it finished and left no partial output, over a complete output (a review)."""
    import signal
    import subprocess
    import sys

    script = textwrap.dedent("""
        import os, signal, sys
        from mmoe_rec import output_dir
        real = os.replace
        def replace(src, dst):  # a SIGTERM arrives during the swap
            os.kill(os.getpid(), signal.SIGTERM)
            real(src, dst)
        output_dir.os.replace = replace
        from mmoe_rec.cli import main
        sys.exit(main(["synth", "mmoe", "--rows", "50", "--output", "out"]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "mmoe-rec synth: stopped by SIGTERM once its work was done (wrote out)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and list((tmp_path / "out").glob("*.parquet"))


def test_a_stopped_job_says_what_it_leaves_and_counts_only_its_own_thread_s_steps():
    """A review: the completed outputs were counted process-wide, so another thread's output made a stopped job
    claim it was complete; a register stopped after its version was made said none was."""
    import threading

    from mmoe_rec import cli, job_outcome

    assert "no version was made and no alias moved" in cli._stopped_job_message("register", [])
    assert cli._stopped_job_message("score", []).endswith("it left no partial output")
    assert cli._stopped_job_message("register", ["registered m version 3, alias 'champion'"]) == (
        "mmoe-rec register: stopped by SIGTERM once its work was done (registered m version 3, alias 'champion')")
    with job_outcome.collecting() as done:
        other = threading.Thread(target=job_outcome.done, args=("wrote another thread's output",))
        other.start()
        other.join()
        job_outcome.done("wrote out")
    job_outcome.done("outside any job")
    assert done == ["wrote out"]


# For a subprocess: .xz files read slowly through Python's lzma (as Arrow's reader thread reads them), so that a
# read is in progress when the job stops; MARK (a path or None) is touched by a read once the build writes output.
SLOW_LZMA_READS = textwrap.dedent("""
    import lzma, os, sys, time
    from mmoe_rec.features import sources

    class Slow:
        def __init__(self, f):
            self.f = f
        def read(self, n=-1):
            if MARK and any(p.startswith(".out.tmp-") for p in os.listdir(".")):
                open(MARK, "w").close()  # the transform pass is reading
            time.sleep(0.05)
            return self.f.read(min(n, 4096) if n and n > 0 else 4096)
        def __getattr__(self, name):
            return getattr(self.f, name)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.f.close()

    real = lzma.open
    sources.lzma.open = lambda *a, **k: Slow(real(*a, **k))
""")


def test_sigterm_while_arrow_reads_an_xz_file_through_python_ends_the_job_cleanly(tmp_path):
    """.xz input is read by Arrow's CSV reader from Python's lzma file, on Arrow's own threads. SIGTERM ended the job
    through SystemExit and then the interpreter's shutdown, during which such a thread, still inside Python's read,
    aborted the process (exit 134, "Fatal Python error: PyGILState_Release"). The reads are slowed here so that one
    is in progress when the signal comes."""
    import lzma
    import signal
    import subprocess
    import sys

    with lzma.open(tmp_path / "raw.csv.xz", "wt", preset=0) as f:
        f.write("city,y\n" + "".join(f"c{i % 5},{i % 2}\n" for i in range(20_000)))
    (tmp_path / "s.yaml").write_text("categorical: [{name: city}]\ntasks: [{name: y, column: y, type: binary}]\n")
    reading = tmp_path / "reading"
    script = f"MARK = {str(reading)!r}\n" + SLOW_LZMA_READS + textwrap.dedent("""
        from mmoe_rec.cli import main
        sys.exit(main(["features", "--schema", "s.yaml", "--input", "train=raw.csv.xz", "--output", "out"]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(reading, proc)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        err = proc.stderr.read()
        assert code == 128 + signal.SIGTERM, (code, err[-2000:])
        assert "Fatal Python error" not in err and "terminate called" not in err
    finally:
        proc.kill()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert not (tmp_path / "out").exists()


def test_a_host_programs_sigterm_handler_is_left_alone_and_the_default_restored(monkeypatch):
    """main() run inside another program: its own SIGTERM handler stays in force during the job; where SIGTERM has
    its default action, the job's handler is installed for the job only."""
    import signal

    from mmoe_rec import cli
    from mmoe_rec.features import build

    during = []
    monkeypatch.setattr(build, "main", lambda argv: during.append(signal.getsignal(signal.SIGTERM)) or 0)

    def host(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, host)
    try:
        assert cli.main(["features"]) == 0 and during[-1] is host
        assert signal.getsignal(signal.SIGTERM) is host
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        assert cli.main(["features"]) == 0 and during[-1] is cli._sigterm
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_failed_xz_build_exits_with_its_error_code_not_an_abort(tmp_path):
    """A build that stops on bad data leaves Arrow's CSV reader half-way; over an .xz file its read-ahead thread
    reads through Python's lzma, and the interpreter's shutdown under it aborted the process after the error was
    printed (exit 134, "Fatal Python error: PyGILState_Release"). The reads are slowed so that one is in progress."""
    import lzma
    import subprocess
    import sys

    with lzma.open(tmp_path / "raw.csv.xz", "wt", preset=0) as f:
        f.write("age,y\nabc,1\n" + "".join(f"{i % 90},{i % 2}\n" for i in range(20_000)))
    (tmp_path / "s.yaml").write_text("numeric: [{name: age}]\ntasks: [{name: y, column: y, type: binary}]\n")
    script = "MARK = None\n" + SLOW_LZMA_READS + textwrap.dedent("""
        from mmoe_rec.cli import main
        sys.exit(main(["features", "--schema", "s.yaml", "--input", "train=raw.csv.xz", "--output", "out"],
                      process=True))
    """)
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)
        assert "column 'age', row 0 (0-based): expected a number, found 'abc'" in done.stderr, done.stderr[-2000:]
        assert done.returncode == 1 and "Fatal Python error" not in done.stderr, (done.returncode, done.stderr[-2000:])


def test_a_process_that_leaves_an_xz_reader_half_way_exits_cleanly():
    """Arrow's CSV reader over Python's lzma read the .xz file from Arrow's own threads: a process that took one
    batch of census test.csv.xz and exited (a library user, a test) aborted in the interpreter's shutdown, a read
    still in progress (3 runs of 3). An .xz file is now decompressed to a temporary file Arrow reads natively."""
    import subprocess
    import sys
    from pathlib import Path

    raw = Path(__file__).resolve().parents[1] / "data" / "census_income" / "test.csv.xz"
    if not raw.exists():
        pytest.skip("census raw files not vendored")
    script = textwrap.dedent(f"""
        import pandas, pyarrow.parquet  # a process with more to tear down at exit: a wider window
        from mmoe_rec.data import census
        from mmoe_rec.features import build
        batch = next(census.iter_raw({str(raw)!r}, batch_rows=5000))  # the generator dropped here
        assert batch.num_rows == 5000
        print("ok")
    """)
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-1500:])


class _FailingRows(__import__("torch").utils.data.IterableDataset):
    def __iter__(self):
        from mmoe_rec.features.errors import FeatureDataError

        raise FeatureDataError("label is NaN", file="part-0.parquet", column="label_click", row=3)
        yield 0


def test_an_error_in_a_data_loader_worker_is_one_line_naming_file_column_and_row(capsys, monkeypatch):
    """PyTorch re-raises a worker's error as "Caught ValueError in DataLoader worker process 0." with the worker's
    traceback as its text: the one-line report printed all of it."""
    from torch.utils.data import DataLoader

    from mmoe_rec.cli import _report

    monkeypatch.delenv("MMOE_REC_TRACEBACK", raising=False)
    with pytest.raises(ValueError) as info:
        list(DataLoader(_FailingRows(), num_workers=1))
    assert _report(info.value, ["predict"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[0] == ("error: file part-0.parquet, column 'label_click', row 3 (0-based): label is NaN "
                                   "(in data loader worker 0)"), err


def test_the_command_ends_its_process_with_the_programs_exit_steps_but_not_the_module_teardown():
    """`mmoe-rec` ends its process by os._exit after threading's shutdown and the atexit handlers (the module
    teardown took 2-3 s a process). Joining the threads first waited forever on an idle ThreadPoolExecutor worker
    (MLflow keeps one in its cached artifact repositories: `register` against an HTTP store never exited; a
    review's probe); threading's exit hooks stop such workers first."""
    import subprocess
    import sys

    script = textwrap.dedent("""
        import atexit, concurrent.futures, sys
        from mmoe_rec.cli import main

        pool = concurrent.futures.ThreadPoolExecutor(1)  # left running, idle, as MLflow leaves its download pools
        pool.submit(lambda: None).result()
        atexit.register(lambda: print("atexit handler ran", flush=True))
        print("before the exit")  # buffered: flushed by the exit
        sys.exit(main(["--help"], process=True))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage: mmoe-rec" in done.stdout and "before the exit" in done.stdout
    assert done.stdout.rstrip().endswith("atexit handler ran")


def test_a_closed_output_pipe_is_exit_120_without_a_traceback():
    """`mmoe-rec --help | true`: the flush at the exit met a broken pipe and printed a traceback from inside the
    exit (Python's own exit says one line and exits 120)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout block-buffered into the pipe
    # the reader is gone before the command starts (closing it after the start raced with a command that wrote
    # and exited first on a loaded machine: exit 0)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "mmoe_rec.cli", "--help"], stdout=write_end,
                                stderr=subprocess.PIPE, env=env)
    finally:
        os.close(write_end)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 120, err
    assert "Traceback" not in err, err


def test_a_sigterm_while_a_lightning_subcommand_imports_is_one_line_and_exit_143():
    """The Lightning subcommands import for seconds before their own SIGTERM watch: a SIGTERM then killed the
    process by SIGTERM's default action, without a word (a review)."""
    import subprocess
    import sys

    script = textwrap.dedent("""
        import os, signal, sys

        class SigtermOnImport:  # the SIGTERM arrives while the training CLI's module is being imported
            def find_spec(self, name, path=None, target=None):
                if name == "mmoe_rec.training.cli":
                    os.kill(os.getpid(), signal.SIGTERM)
                return None

        sys.meta_path.insert(0, SigtermOnImport())
        from mmoe_rec.cli import main

        sys.exit(main(["fit", "--config", "nowhere.yaml"], process=True))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 143, done.stderr[-2000:]
    assert done.stderr.strip() == "error: mmoe-rec fit stopped by SIGTERM before it started"


@pytest.mark.parametrize("argv", [[], ["bogus"], ["--version"]], ids=["nothing", "unknown", "unknown-option"])
def test_no_or_an_unknown_subcommand_is_exit_2_with_the_usage_on_stderr(capsys, argv):
    """As argparse does for a usage error: the usage on stderr and exit 2 (a script's `mmoe-rec $JOB` with a typo
    exited 0, as if the job had run); asked for with --help / -h it is exit 0 on stdout."""
    from mmoe_rec import cli

    assert cli.main(argv, process=False) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("usage: mmoe-rec {fit,validate,test,predict,synth,features,register,score}")
    if argv:  # `mmoe-rec fitt`: the mistake said in one line besides the usage
        assert err.splitlines()[-1] == f"error: {argv[0]!r} is no mmoe-rec subcommand", err
    for asked in ("--help", "-h"):
        assert cli.main([asked], process=False) == 0
        out, err = capsys.readouterr()
        assert err == "" and out.startswith("usage: mmoe-rec ")
