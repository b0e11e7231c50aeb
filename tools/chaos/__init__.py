"""The chaos scoreboard: kill a training run again and again, rerun its command each time, and check that it
ends exactly where an uninterrupted run ends.

    python -m tools.chaos --kills 20 --seed 1 [--signal KILL|TERM|mixed] [--nproc 1|2] [--workdir DIR] \\
        -c config/DINO/DINO_demo.py [--coco_path DIR] [--num_workers N] [--options k=v ...] [-- MAIN_ARGS]

Run it from the repository root. Every argument that is not one of the tool's own goes to main.py (those after
`--` always do: main.py's own --seed, for instance); the tool adds --output_dir and --save_log. The outputs are
kept in WORKDIR/reference.log and WORKDIR/starts/NN.log (one per start of the chaos run). What each start did
(where it started, how far it got, whether it stopped on a signal or finished) comes from the events it
appended to OUTPUT_DIR/events.jsonl (util/run_dir.py), never from the log's sentences; only main.py's
`error:` lines (docs/errors.md) are read from its output. The tool:
1. runs the command once, uninterrupted, into WORKDIR/reference;
2. runs it into WORKDIR/chaos and kills it --kills times, rerunning the same command after each kill. The
   instants are drawn with --seed over the reference run's progress events (`step`, every tenth of an epoch,
   and `evaluating`), plus a random part of the time the reference took to its next one (an evaluation: to
   its `evaluated` event). The kills rotate over where (in training; in a checkpoint write: as soon as a
   `.checkpoint*.pth.tmp-PID` file appears; in evaluation), the signal (--signal; mixed alternates SIGKILL and
   SIGTERM), the target (main.py, with --nproc 2 torchrun for SIGTERM and rank 0 for SIGKILL; or the whole
   process group, which with torchrun means every process group of the job, since torchrun starts each rank
   in a session of its own) and the data loading (half of the killed starts get --num_workers 2). Before each
   rerun the tool waits until every process of the killed one (orphaned DataLoader workers included) has
   exited, as a scheduler would;
3. once between two starts flips one bit in the middle of checkpoint.pth (as soon as a numbered checkpoint
   exists to fall back to; not with --no_bit_flip), and once runs a start under a file-size limit of half a
   checkpoint: it must fail its first save with exit code 1 and 'error: could not write checkpoint', leaving
   checkpoint.pth as it was;
4. lets the last start finish and compares with the reference: the model and optimizer tensors of
   checkpoint.pth (torch.equal), and log.txt's train_* values and test_coco_eval_bbox, epoch by epoch.

With --output_dir URL (an object store: s3://bucket/path; main.py's credentials and endpoint variables apply),
the chaos run goes there and every start runs on a new machine: an empty staging folder of its own
(DINO_STAGING_DIR=WORKDIR/machines/NN), as a spot instance that replaces a reclaimed one. WORKDIR/chaos is then
a view of what the bucket holds, refreshed after every start, which the checks read; the bit flip is made there
and uploaded; the file-size start is left out (a new machine's first download of checkpoint.pth would hit the
limit before any save). The reference run stays local.

The last line is the scoreboard; the exit code is 0 only if all of it holds (K == N, F == 0, C == 0, B == M,
identical), 1 otherwise, 2 for a bad command line or a failed reference run:
    kills survived K/N, resume failures F, corrupt files C, bit flips caught B/M, final state identical: yes|no
N  kills that landed (a start that finishes before its kill ends the series early);
K  of them, those whose start ended as that signal should end it (SIGKILL: -9; SIGTERM: 3 after saving; with
   torchrun, which answers a signal with 1: a `stopped` event for SIGTERM, anything for a rank's SIGKILL) with
   no 'error:' line (except from the partner of a killed rank), and whose next start continued from the newest
   intact checkpoint;
F  starts that failed: one that ended by itself with a code other than 0 (the file-size start: other than 1
   with its error line and checkpoint.pth unchanged), ended a kill otherwise than above, did not continue
   exactly where main.py's own resume rule says (its `start` event; e.g. trained from scratch after a
   checkpoint existed), or hung (3 times the reference's duration plus 2 minutes);
C  checkpoint*.pth files that load_checkpoint rejected when the tool looked (after every start and at the
   end; each write counted once), except the file the tool flipped until something rewrites it, plus
   temporary files of saves left at the end;
B  flips that load_checkpoint rejected and after which the run still ended identical, of M flips made.
"""
