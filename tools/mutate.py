#!/usr/bin/env python3
"""A mutation check you can rerun: does the suite catch the bugs that matter?

Each mutant below is one plausible bug: a file, an exact source snippet, its replacement, and
the pytest node ids that must turn red. The tool

1. copies the tree once into a temporary directory (never touching the working tree; ``.git``,
   virtual environments and caches are left out);
2. for each mutant, replaces the snippet in the copy (it must occur exactly once), runs the
   named tests there with a timeout, and restores the file;
3. prints a table of caught / not caught and exits non-zero if any mutant survived (or its
   snippet no longer exists, or its tests errored instead of failing).

Usage: ``python tools/mutate.py [--list] [--check] [-k NAME] [--timeout SECONDS]``.
``--check`` only verifies that every snippet still exists verbatim (the fast pytest guard in
``tests/test_mutants.py`` runs it, so the list cannot rot silently). Add a mutant for every bug
found: the list grows with the bugs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    """One injected bug: ``edits`` are (original, replacement) pairs in ``path``."""

    name: str
    path: str
    edits: tuple[tuple[str, str], ...]
    tests: tuple[str, ...]


MUTANTS = (
    Mutant("Ok-Topk: a rank reports its whole selection as sent", "sparsecoll/collectives/oktopk.py",
           (("in_result = np.isin(local[0], indices, assume_unique=True)",
             "in_result = np.ones(local[0].size, bool)"),),
           ("tests/collectives/test_oktopk.py::test_oktopk_against_a_reference_at_every_world_size",)),
    Mutant("Ok-Topk: an owner leaves its own entries out of its region's sum", "sparsecoll/collectives/oktopk.py",
           (("parts[rank] = (indices[cuts[rank]:cuts[rank + 1]], values[cuts[rank]:cuts[rank + 1]])",
             "parts[rank] = (indices[:0], values[:0])"),),
           ("tests/collectives/test_oktopk.py::test_oktopk_against_a_reference_at_every_world_size",)),
    Mutant("Ok-Topk: the global cut one histogram bin too high", "sparsecoll/collectives/oktopk.py",
           (("(bin1 << LEVEL1_SHIFT) | (bin2 << LEVEL2_SHIFT)", "(bin1 << LEVEL1_SHIFT) | ((bin2 + 1) << LEVEL2_SHIFT)"),),
           ("tests/collectives/test_oktopk.py::test_oktopk_against_a_reference_at_every_world_size",)),
    Mutant("Ok-Topk: a reused local threshold's surplus is sent", "sparsecoll/collectives/oktopk.py",
           (("    if indices.size > count:\n", "    if indices.size > 2 * count:\n"),),
           ("tests/collectives/test_oktopk.py::test_oktopk_against_a_reference_at_every_world_size",)),
    Mutant("Ok-Topk: the index histogram on every call", "sparsecoll/collectives/oktopk.py",
           (("        if estimate:\n            summed", "        if True:\n            summed"),),
           ("tests/collectives/test_oktopk.py::test_oktopk_against_a_reference_at_every_world_size",)),
    Mutant("Ok-Topk: estimation left out of the signature", "sparsecoll/collectives/oktopk.py",
           (("Algorithm.TOPK if estimate else Algorithm.THRESHOLD", "Algorithm.TOPK"),),
           ("tests/collectives/test_oktopk.py::test_a_disagreeing_rank_fails_every_rank",)),
    Mutant("Ok-Topk: the optimizer drops the bucket's state", "sparsecoll/torch/optimizer.py",
           (("lazy=lazy, algorithm_state=algorithm_state,\n",
             "lazy=lazy, algorithm_state=None,\n"),),
           ("tests/torch/test_oktopk_training.py",)),
    Mutant("overlap: backward hooks never launch a bucket", "sparsecoll/torch/overlap.py",
           (("            self.launched_by_backward += 1\n            self._launch(index)\n", "            return\n"),),
           ("tests/torch/test_overlap.py::test_overlap_gives_the_parameters_of_overlap_off_bit_for_bit",)),
    Mutant("overlap: every bucket on the group itself, no lanes", "sparsecoll/torch/overlap.py",
           (("self.sync.submit(self._reduction()(bucket, self.lanes[index], capture(bucket.flat)))",
             "self.sync.submit(self._reduction()(bucket, self.sync.group, capture(bucket.flat)))"),),
           ("tests/torch/test_overlap.py::test_overlap_gives_the_parameters_of_overlap_off_bit_for_bit",)),
    Mutant("overlap: a second backward accumulates into a launched bucket", "sparsecoll/torch/overlap.py",
           (("    def _check_open(self, index: int) -> None:\n        if self._futures[index] is not None:",
             "    def _check_open(self, index: int) -> None:\n        if False:"),),
           ("tests/torch/test_overlap.py::test_bad_input_under_overlap_raises_clearly_and_leaves_the_next_step_working",)),
    Mutant("overlap: a dropped round skips the agreement", "sparsecoll/torch/overlap.py",
           (("            self._agree_and_drain((), stepping=False)", "            self._drain()"),),
           ("tests/torch/test_overlap.py::test_bad_input_under_overlap_raises_clearly_and_leaves_the_next_step_working",)),
    Mutant("overlap: backward ends without launching the buckets it did not reach", "sparsecoll/torch/overlap.py",
           (("        self._callback_queued = False\n        self._launch_remaining()\n",
             "        self._callback_queued = False\n"),),
           ("tests/torch/test_overlap.py::test_bad_input_under_overlap_raises_clearly_and_leaves_the_next_step_working",)),
    Mutant("overlap: a bucket with NaN on one rank is reduced anyway", "sparsecoll/torch/overlap.py",
           (("        if await any_rank_flags(lane, not all_finite(bucket.gradient)):\n            return None\n", ""),),
           ("tests/torch/test_overlap.py::test_bad_input_under_overlap_raises_clearly_and_leaves_the_next_step_working",)),
    Mutant("DDP hook: buckets one after another", "sparsecoll/torch/ddp_hook.py",
           (("        future = self.group.submit(coroutine)\n",
             "        wait_all(self.group, list(self._in_flight))\n        future = self.group.submit(coroutine)\n"),),
           ("tests/torch/test_ddp_hook_concurrent.py",)),
    Mutant("stochastic rounding -> round to nearest", "kernels/_scalar.py",
           (("    if u < pos - low:\n", "    if 0.5 < pos - low:\n"),),
           ("tests/kernels/test_quantize.py::test_quantization_is_unbiased",)),
    Mutant("gTop-k survival: alive &= -> alive =", "sparsecoll/collectives/gtopk.py",
           (("alive &= np.isin(local_indices, kept", "alive = np.isin(local_indices, kept"),),
           ("tests/collectives/test_invariants.py::test_gtopk_sent_set_matches_a_survival_reference",)),
    Mutant("error feedback subtracts the global result", "sparsecoll/torch/error_feedback.py",
           (("indices = to_tensor(result.sent_indices, self.residual)",
             "indices = to_tensor(result.indices, self.residual)"),
            ("values = to_tensor(result.sent_values, self.residual)",
             "values = to_tensor(result.values, self.residual)")),
           ("tests/torch/test_conservation.py",)),
    Mutant("optimizer mean drops the division by P (sparse path)", "sparsecoll/torch/exchange.py",
           (("mean = values / group.size", "mean = values.clone()"),),
           ("tests/torch/test_conservation.py",)),
    Mutant("optimizer mean drops the division by P (dense path)", "sparsecoll/torch/exchange.py",
           (("torch.div(total.view_as(grad), group.size, out=grad)", "grad.copy_(total.view_as(grad))"),),
           ("tests/torch/test_conservation.py",)),
    Mutant("no abort frame sent", "sparsecoll/group.py",
           (("        self.transport.send_abort(error)\n", "\n"),),
           ("tests/test_group.py::test_abort_reaches_peers_and_closed_group_refuses_calls[tcp]",)),
    Mutant("skip the signature comparison", "sparsecoll/transport/mailbox.py",
           (("queue[0].header.signature != signature:", "False:"),
            ("if active is not None and active != header.signature:", "if False:"),
            ("if posted.signature is not None and header.signature != posted.signature:", "if False:")),
           ("tests/test_mismatch_matrix.py",)),
    Mutant("uint32 indices past 2^32 elements", "sparsecoll/wire.py",
           (("np.dtype(np.uint32) if size < (1 << 32) else", "np.dtype(np.uint32) if size < (1 << 33) else"),),
           ("tests/collectives/test_index_width.py",)),
    Mutant("p2p: a kept message is delivered newest first", "sparsecoll/transport/mailbox.py",
           (("pending = queued.popleft()", "pending = queued.pop()"),),
           ("tests/test_p2p.py::test_ordering_and_tag_matching_under_random_interleavings",)),
    Mutant("p2p: a frame claims the newest posted receive", "sparsecoll/transport/mailbox.py",
           (("posted = queue[0]\n            try:", "posted = queue[-1]\n            try:"),),
           ("tests/test_p2p.py::test_ordering_and_tag_matching_under_random_interleavings",)),
    Mutant("cancelled receive keeps streaming into out", "sparsecoll/transport/mailbox.py",
           (("self._unpost(posted)\n        if posted.landing is not None:\n            posted.landing.withdraw()",
             "self._unpost(posted)\n        if False:\n            posted.landing.withdraw()"),),
           ("tests/test_p2p.py::test_cancellation_mid_transfer",)),
    Mutant("a send cancelled mid-frame leaves the group usable", "sparsecoll/transport/base.py",
           (("            if connection.tx_broken:\n                self.on_failure(GroupAbortedError(",
             "            if False:\n                self.on_failure(GroupAbortedError("),),
           ("tests/test_p2p.py::test_cancellation_mid_transfer",)),
    Mutant("UCX close flushes payload endpoints after the peer moved on", "sparsecoll/transport/ucx.py",
           (("        await asyncio.gather(*(connection.close_payload_endpoint() for connection in "
             "self._connections.values()))\n", ""),),
           ("tests/transport/test_ucx.py::test_a_close_does_not_wait_for_a_peer_that_has_moved_on",)),
    Mutant("a header leaves its receive on the match queue (ANY_SOURCE mixes senders)",
           "sparsecoll/transport/mailbox.py",
           (("            self._unpost(posted)\n            posted.source = peer\n",
             "            posted.source = peer\n"),),
           ("tests/transport/test_conformance.py::test_any_source_receives_into_out_never_mix_senders",)),
    Mutant("kernel cache stamped by the kernel's own file only", "kernels/__init__.py",
           (("_cache.install()  #", "_cache.__name__  #"),),
           ("tests/kernels/test_cache.py",)),
    Mutant("hierarchical: host sum added in reverse local-rank order", "sparsecoll/collectives/hierarchical.py",
           (("            total = parts[shard][0].copy()\n            for part in parts[shard][1:]:",
             "            total = parts[shard][-1].copy()\n            for part in parts[shard][-2::-1]:"),),
           ("tests/collectives/test_hierarchical.py::test_two_levels_equal_the_model_on_every_rank",)),
    Mutant("hierarchical: a rank reports its host's sum as sent", "sparsecoll/collectives/hierarchical.py",
           (("return SparseResult(all_indices, np.concatenate(values), size, sent_indices, flat[sent_indices])",
             "return SparseResult(all_indices, np.concatenate(values), size, sent_indices, "
             "np.concatenate(values)[np.isin(all_indices, sent_indices)])"),),
           ("tests/collectives/test_hierarchical.py::test_two_levels_equal_the_model_on_every_rank",)),
    Mutant("hierarchical: every result entry counted as sent", "sparsecoll/collectives/hierarchical.py",
           (("mask = np.isin(result.indices, result.sent_indices, assume_unique=True)",
             "mask = np.ones(result.indices.size, bool)"),),
           ("tests/collectives/test_hierarchical.py::test_two_levels_equal_the_model_on_every_rank",)),
    Mutant("hierarchical: every shard gets all k", "sparsecoll/collectives/hierarchical.py",
           (("counts = _shard_k(table, resolve_k(size, k, density))",
             "counts = [resolve_k(size, k, density)] * shards"),),
           ("tests/collectives/test_hierarchical.py::test_two_levels_equal_the_model_on_every_rank",)),
    Mutant("hierarchical: one host or one rank a host still goes two-level", "sparsecoll/topology.py",
           (("return self.host_count > 1 and self.shard_count > 1", "return True"),),
           ("tests/collectives/test_hierarchical.py::test_two_levels_equal_the_model_on_every_rank",
            "tests/test_topology.py")),
    Mutant("topology: LOCAL_RANK ignored inside a host", "sparsecoll/topology.py",
           (("                ranks = [member for _, member in sorted(zip(local_ranks, ranks))]\n", "\n"),),
           ("tests/test_topology.py",)),
    Mutant("CommStats: bytes to other hosts not counted on receive", "sparsecoll/call.py",
           (("        if self._remote(posted.peer):", "        if False:"),),
           ("tests/collectives/test_hierarchical.py::test_bytes_to_other_hosts_are_counted_apart",)),
    Mutant("CommStats: every byte counted as to another host", "sparsecoll/call.py",
           (("return mine is not None and peer in self.host_keys and self.host_keys[peer] != mine",
             "return mine is not None"),),
           ("tests/collectives/test_hierarchical.py::test_bytes_to_other_hosts_are_counted_apart",)),
    Mutant("hierarchical: CLT-k leader the same host on every shard", "sparsecoll/collectives/hierarchical.py",
           (("step=step + shard, timeout=timeout", "step=step, timeout=timeout"),),
           ("tests/collectives/test_hierarchical.py::test_two_levels_equal_the_model_on_every_rank",)),
    Mutant("hierarchical: a rank reports its host's whole sum as sent, selected or not",
           "sparsecoll/collectives/hierarchical.py",
           (("        sent_indices = np.intersect1d(sent_indices, selected[0], assume_unique=True)\n", "\n"),),
           ("tests/collectives/test_hierarchical.py::test_two_levels_equal_the_model_on_every_rank",)),
    Mutant("two-level calls start their steps in arrival order", "sparsecoll/topology.py",
           (("        while self._next[step] != ticket:\n            await self._changed.wait()\n", "\n"),),
           ("tests/collectives/test_hierarchical.py::test_concurrent_calls_keep_their_order",
            "tests/torch/test_hierarchical_training.py")),
    Mutant("fused pass: Nesterov drops its + g", "kernels/_fused_scalar.py",
           (("return u, rounded(residual, rounded(residual, v + u) + g)", "return u, rounded(residual, v + u)"),),
           ("tests/kernels/test_fused.py",)),
    Mutant("fused pass: weight decay not folded", "kernels/_fused_scalar.py",
           (("    if with_decay:\n        g = rounded(grad,", "    if False:\n        g = rounded(grad,"),),
           ("tests/kernels/test_fused.py",)),
    Mutant("fused pass: the sent gradient is not zeroed", "kernels/_fused_scalar.py",
           (("        if zero_grad:\n            grad[i] = 0", "        if False:\n            grad[i] = 0"),),
           ("tests/kernels/test_fused.py", "tests/torch/test_fused_step.py")),
    Mutant("fused selection keeps every candidate (no exact-k finish)", "kernels/fused.py",
           (("        idx, raw = _finish_exact_k(idx, raw, fmt, k)\n", "        pass\n"),),
           ("tests/kernels/test_fused.py",)),
    Mutant("ScaleCom filter in the pass: momentum not masked", "sparsecoll/torch/error_feedback.py",
           (("            self.momentum.index_fill_(0, sent_at, 0)", "            pass"),),
           ("tests/torch/test_fused_step.py",)),
    Mutant("ScaleCom filter in the pass: sent part not scaled by beta", "sparsecoll/torch/error_feedback.py",
           (("contribution, alpha=-memory_beta)", "contribution, alpha=-1)"),),
           ("tests/torch/test_fused_step.py",)),
    Mutant("sparse SGD applies lr twice", "sparsecoll/torch/sparse_update.py",
           (("moved.add_(values, alpha=-lr)", "moved.add_(values, alpha=-2 * lr)"),),
           ("tests/torch/test_fused_step.py",)),
    Mutant("sparse SGD forgets the parameter's offset in its bucket", "sparsecoll/torch/sparse_update.py",
           (("local = chosen - offsets[position]", "local = chosen.clamp(max=param.numel() - 1)"),),
           ("tests/torch/test_fused_step.py",)),
    Mutant("a CPU kernel holds the GIL", "kernels/_fused_cpu.py",
           (("@njit(nogil=True, cache=True)\ndef sample_keys", "@njit(cache=True)\ndef sample_keys"),),
           ("tests/kernels/test_fused.py::test_every_cpu_kernel_releases_the_gil",)),
    Mutant("GPU check: a step past its timeout leaves no row", "sparsecoll/bench/gpu_check.py",
           (("    if timed_out:\n        rows.append(Row(step.name", "    if False:\n        rows.append(Row(step.name"),),
           ("tests/bench/test_gpu_check.py::test_a_step_past_its_timeout_is_killed_with_its_children_and_keeps_its_rows",)),
    Mutant("GPU check: a timeout kills the step but not its children", "sparsecoll/bench/gpu_check.py",
           (("os.killpg(process.pid, signal.SIGKILL)", "process.kill()"),),
           ("tests/bench/test_gpu_check.py::test_a_step_past_its_timeout_is_killed_with_its_children_and_keeps_its_rows",)),
    Mutant("GPU check: a crashed step passes", "sparsecoll/bench/gpu_check.py",
           (("    elif code != 0:\n", "    elif False:\n"),),
           ("tests/bench/test_gpu_check.py::test_a_crashed_step_fails_with_its_output_and_the_exit_status_says_so",)),
    Mutant("GPU check: the dry run runs the gpu tests", "sparsecoll/bench/gpu_check.py",
           (("    if dry_run:\n        return [Row(\"gpu-tests\"", "    if False:\n        return [Row(\"gpu-tests\""),),
           ("tests/bench/test_gpu_check.py::test_dry_run_skips_every_device_row_and_passes_the_rest",)),
    Mutant("GPU check: the shell script drops its arguments", "tools/gpu_check.sh",
           (("--budget \"$budget\" \"$@\"", "--budget \"$budget\""),),
           ("tests/bench/test_gpu_check.py::test_dry_run_skips_every_device_row_and_passes_the_rest",)),
    Mutant("GPU check: the gTop-k reference selects by value, not magnitude", "sparsecoll/bench/gpu_check_ranks.py",
           (("chosen = np.sort(np.argpartition(np.abs(grad), grad.size - k)", "chosen = np.sort(np.argpartition(grad, grad.size - k)"),),
           ("tests/bench/test_gpu_check.py::test_dry_run_skips_every_device_row_and_passes_the_rest",)),
    Mutant("GPU check: replicas compared on one rank", "sparsecoll/bench/gpu_check_train.py",
           (("identical = first[\"digest\"] == second[\"digest\"]", "identical = first[\"digest\"] == first[\"digest\"]"),),
           ("tests/bench/test_gpu_check.py::test_training_rows_fail_on_differing_replicas_or_a_d_sized_copy",)),
    Mutant("GPU check: d-sized host copies do not fail the training row", "sparsecoll/bench/gpu_check_train.py",
           (("status = OK if identical and large == 0 and not library_large else FAIL", "status = OK if identical else FAIL"),),
           ("tests/bench/test_gpu_check.py::test_training_rows_fail_on_differing_replicas_or_a_d_sized_copy",)),
    Mutant("GPU check: the floor target never judged", "sparsecoll/bench/gpu_check_kernels.py",
           (("and metrics[\"fast_vs_floor\"] > FLOOR_TARGET", "and metrics[\"fast_vs_floor\"] > 10 * FLOOR_TARGET"),),
           ("tests/bench/test_gpu_check.py::test_selection_rows_judge_correctness_and_the_floor_target",)),
    Mutant("GPU check: the UCX target never judged", "sparsecoll/bench/gpu_check_ranks.py",
           (("if status == OK and result[\"gbps\"] < P2P_TARGET_GBPS:", "if False:"),),
           ("tests/bench/test_gpu_check.py::test_ucx_rows_judge_the_device_bandwidth_against_staging_and_the_target",)),
    Mutant("copy audit: a copy of exactly the d-sized bound is not d-sized", "sparsecoll/bench/host_copy_audit.py",
           (("nbytes >= self.large_bytes", "nbytes > self.large_bytes"),),
           ("tests/bench/test_gpu_check.py::test_the_copy_audit_counts_moves_between_devices_by_size_and_restores_torch",)),
    Mutant("copy audit: torch's methods stay wrapped", "sparsecoll/bench/host_copy_audit.py",
           (("                delattr(owner, name)", "                pass"),),
           ("tests/bench/test_gpu_check.py::test_the_copy_audit_counts_moves_between_devices_by_size_and_restores_torch",)),
    Mutant("dense_fp16: the optimizer drops the option", "sparsecoll/torch/optimizer.py",
           (("memory_beta, dense_fp16=bool(dense_fp16))", "memory_beta)"),),
           ("tests/torch/test_dense_fp16.py",)),
    Mutant("dense_fp16: an overflowed float16 mean is kept", "sparsecoll/torch/exchange.py",
           (("    if not all_finite(half):\n", "    if False:\n"),),
           ("tests/torch/test_dense_fp16.py",)),
    Mutant("dense_fp16: the hook drops the option", "sparsecoll/torch/ddp_hook.py",
           (("memory_beta, dense_fp16=bool(dense_fp16))", "memory_beta)"),),
           ("tests/torch/test_dense_fp16.py",)),
    Mutant("rendezvous: a group after torch's own hosts a second store", "sparsecoll/rendezvous.py",
           (("    shared = _torch_default_store(rank, world_size)\n", "    shared = None\n"),),
           ("tests/test_rendezvous.py::test_a_group_after_torchs_own_shares_its_store",)),
    Mutant("hook: buckets known by size only without module= keep a reordered residual", "sparsecoll/torch/ddp_hook.py",
           (("        layout = (tuple(param.numel() for param in params) if self._names is None", "        layout = (None if self._names is None"),
            ('self._layouts[int(index)] = tuple(state.get("bucket_sizes", {}).get(index, ()))', "self._layouts[int(index)] = None")),
           ("tests/torch/test_ddp_hook.py::test_ddp_hook_resumes_exactly_from_saved_state",)),
    Mutant("hook: a loaded Ok-Topk state is not taken back", "sparsecoll/torch/ddp_hook.py",
           (("        if kept is not None and saved_algorithm is not None:\n", "        if False:\n"),),
           ("tests/torch/test_ddp_hook.py::test_ddp_hook_resumes_exactly_from_saved_state",)),
    Mutant("hook: a rebuilt bucket does not take over its parameters' Ok-Topk state", "sparsecoll/torch/ddp_hook.py",
           (("            self._saved_algorithm.update(self._per_parameter_set())\n", ""),),
           ("tests/torch/test_ddp_hook.py::test_ddp_hook_resumes_exactly_from_saved_state",)),
    Mutant("hook: sgd_step leaves an LR scheduler thinking no step was taken", "sparsecoll/torch/ddp_hook.py",
           (("        optimizer._opt_called = True", "        pass"),),
           ("tests/torch/test_ddp_hook.py::test_sgd_step_counts_as_the_optimizers_step_for_an_lr_scheduler",)),
    Mutant("step flags: a NaN on some rank does not skip the step", "sparsecoll/torch/step_flags.py",
           (("        return overflowed or nonfinite\n", "        return overflowed\n"),),
           ("tests/torch/test_nonfinite.py",)),
    Mutant("optimizer: clipping reads the norm before this step's flags measure it", "sparsecoll/torch/optimizer.py",
           (("        local_flags = self._local_flags(stray)  # unscales under AMP: clipping below measures the true norm\n"
             "        prepared = self._prepare_exchange()\n",
             "        prepared = self._prepare_exchange()\n"
             "        local_flags = self._local_flags(stray)\n"),),
           ("tests/torch/test_optimizer.py::test_amp_clips_the_unscaled_gradient",)),
    Mutant("step flags: the clipping norm's read misses a NaN", "sparsecoll/torch/step_flags.py",
           (("            nonfinite = not math.isfinite(self.clip_squared_norm)\n", "            nonfinite = False\n"),),
           ("tests/torch/test_optimizer.py::test_clipping_reads_the_norm_and_still_skips_a_nonfinite_step",)),
    Mutant("hook: residuals stay in the old loss scale", "sparsecoll/torch/ddp_hook.py",
           (("                memory.rescale(factor)\n", "                pass\n"),),
           ("tests/torch/test_ddp_hook.py::test_residuals_follow_the_loss_scale_as_amp_changes_it",)),
    Mutant("hook: a loaded state forgets its loss scale", "sparsecoll/torch/ddp_hook.py",
           (('self._loss_scale, self._scale_read_at = state.get("loss_scale"), -1', "self._loss_scale, self._scale_read_at = None, -1"),),
           ("tests/torch/test_ddp_hook.py::test_residuals_follow_the_loss_scale_as_amp_changes_it",)),
    Mutant("Accordion: the hook's AMP-scaled gradients summed as they are", "sparsecoll/torch/density.py",
           (("        total.add_(buffer.detach(), alpha=1.0 / scale)", "        total.add_(buffer.detach())"),),
           ("tests/torch/test_ddp_hook.py::test_residuals_follow_the_loss_scale_as_amp_changes_it",)),
    Mutant("hook: sgd_step steps AMP's scaled gradients", "sparsecoll/torch/ddp_hook.py",
           (("        if self.grad_scaler is not None and self.grad_scaler.is_enabled():\n", "        if False:\n"),),
           ("tests/torch/test_ddp_hook.py::test_residuals_follow_the_loss_scale_as_amp_changes_it",)),
    Mutant("two-level: step 2 reads the dense shard again", "sparsecoll/collectives/hierarchical.py",
           (("    if indices.size < count:\n        return await between\n", "    return await between\n"),),
           ("tests/collectives/test_hierarchical.py::test_step_two_selects_among_the_summed_pairs_not_the_dense_shard",)),
    Mutant("two-level: fewer pairs than the shard's k still preselected", "sparsecoll/collectives/hierarchical.py",
           (("    if indices.size < count:\n", "    if indices.size < 0:\n"),),
           ("tests/collectives/test_hierarchical.py::test_step_two_selects_among_the_summed_pairs_not_the_dense_shard",)),
    Mutant("step flags: the clipping norm is the loss-scaled gradient's", "sparsecoll/torch/step_flags.py",
           (("            self.clip_squared_norm = squared_norm([bucket.gradient for bucket in self.buckets])\n",
             "            self.clip_squared_norm = squared_norm([bucket.gradient for bucket in self.buckets]) * (\n"
             "                1.0 if grad_scale is None else float(grad_scale) ** 2)\n"),),
           ("tests/torch/test_optimizer.py::test_amp_clips_the_unscaled_gradient",)),
    Mutant("dense_fp16 refuses quantize_bits on every algorithm again", "sparsecoll/torch/exchange.py",
           (('dense_quantized = self.quantize_bits is not None and self.algorithm == "dense"',
             "dense_quantized = self.quantize_bits is not None"),),
           ("tests/torch/test_dense_fp16.py::test_a_sparse_algorithm_takes_it_with_quantized_values",)),
    Mutant("the sparse steps drop quantize_bits", "sparsecoll/torch/exchange.py",
           (('    if compression.quantize_bits:\n        options["quantize_bits"] = compression.quantize_bits\n',
             ""),),
           ("tests/torch/test_dense_fp16.py::test_dense_steps_go_float16_and_sparse_steps_quantized_in_one_run",)),
    Mutant("the train bench's optimizer rows ignore --quantize-bits", "sparsecoll/bench/train_methods.py",
           (('                                    quantize_bits=config.get("quantize_bits"),\n', ""),),
           ("tests/bench/test_train_levers.py::test_accordion_reaches_every_rank_and_spends_dense_bytes_in_critical_epochs",)),
    Mutant("the train bench's levers leave a plain value in the configuration", "sparsecoll/bench/train.py",
           (("if key not in plain or value != plain[key]}", "}"),),
           ("tests/bench/test_train_levers.py::test_configurations_take_each_schedule_and_scale_and_dense_runs_once_plain",)),
    Mutant("the hook warns of split buckets every iteration", "sparsecoll/torch/ddp_hook.py",
           (("        self._warned_split = True\n", ""),),
           ("tests/torch/test_ddp_hook.py::test_split_buckets_warn_once_that_each_is_compressed_on_its_own",)),
    Mutant("the hook never warns of split buckets", "sparsecoll/torch/ddp_hook.py",
           (("    if compressed and index > 0 and bucket.is_last():", "    if compressed and index < 0:"),),
           ("tests/torch/test_ddp_hook.py::test_split_buckets_warn_once_that_each_is_compressed_on_its_own",)),
    Mutant("the bench's hook rows keep DDP's buckets", "sparsecoll/bench/train.py",
           (('                config.setdefault("one_bucket", True)', '                config.setdefault("one_bucket", False)'),),
           ("tests/bench/test_train_baselines.py::test_ddp_powersgd_and_sparsecoll_rows_train_the_same_model_in_one_run",)),
    Mutant("dense_above='auto' loses its 0.25 cap", "sparsecoll/torch/exchange.py",
           (("return AUTO_DENSE_ABOVE if even is None else min(even, AUTO_DENSE_ABOVE)",
             "return AUTO_DENSE_ABOVE if even is None else even"),),
           ("tests/torch/test_dense_above.py::test_the_cut_is_the_byte_break_even_at_most_a_quarter",)),
    Mutant("dense_above='auto' prices the dense steps in float32 under dense_fp16", "sparsecoll/torch/exchange.py",
           (("dense_itemsize = 2 if self.dense_fp16 and itemsize == 4 else itemsize", "dense_itemsize = itemsize"),),
           ("tests/torch/test_dense_above.py::test_a_step_past_the_break_even_reduces_dense_in_float16",)),
    Mutant("the step ignores dense_above='auto'", "sparsecoll/torch/exchange.py",
           (('return self.algorithm != "dense" and density < self.dense_cut(ranks, size, itemsize)',
             'return self.algorithm != "dense" and density < AUTO_DENSE_ABOVE'),),
           ("tests/torch/test_dense_above.py::test_a_step_past_the_break_even_reduces_dense_in_float16",)),
    Mutant("the byte formula drops the quantized values' size", "sparsecoll/collectives/cost_bytes.py",
           (("return (ranks - 1) * pair_frame(k, size, itemsize, bits)", "return (ranks - 1) * pair_frame(k, size, itemsize)"),),
           ("tests/collectives/test_cost_bytes.py::test_quantized_pairs_bytes_are_what_ranks_send",)),
)

_IGNORED = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis",
                                  "*.egg-info", "build", "dist", "bench-results")


def missing_snippets(root: Path = ROOT, mutants: tuple[Mutant, ...] = MUTANTS) -> list[str]:
    """Why each of ``mutants`` cannot be applied to the tree at ``root`` ([] when all can)."""
    problems = []
    for mutant in mutants:
        path = root / mutant.path
        if not path.is_file():
            problems.append(f"{mutant.name}: {mutant.path} does not exist")
            continue
        source = path.read_text()
        for original, _ in mutant.edits:
            count = source.count(original)
            if count != 1:
                problems.append(f"{mutant.name}: {original!r} occurs {count} times in {mutant.path}, not once")
        for test in mutant.tests:
            if not (root / test.split("::")[0]).is_file():
                problems.append(f"{mutant.name}: test file of {test} does not exist")
    return problems


def run_mutant(mutant: Mutant, copy: Path, timeout: float) -> tuple[str, float]:
    """Apply ``mutant`` in ``copy``, run its tests, restore; the verdict and the seconds taken."""
    path = copy / mutant.path
    original_source = path.read_text()
    mutated = original_source
    for original, replacement in mutant.edits:
        mutated = mutated.replace(original, replacement, 1)
    path.write_text(mutated)
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *mutant.tests]
    started = time.monotonic()
    try:
        completed = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        verdict = {0: "NOT CAUGHT", 1: "caught"}.get(completed.returncode,
                                                     f"error (pytest exit {completed.returncode})")
    except subprocess.TimeoutExpired:
        verdict = f"timed out after {timeout:.0f} s"
    finally:
        path.write_text(original_source)
    return verdict, time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--check", action="store_true", help="only check that every snippet exists")
    parser.add_argument("-k", dest="select", default="", help="run only mutants whose name contains this")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant's test run")
    options = parser.parse_args(argv)
    if options.list:
        for mutant in MUTANTS:
            print(f"{mutant.name}  [{mutant.path}]  -> {' '.join(mutant.tests)}")
        return 0
    chosen = tuple(mutant for mutant in MUTANTS if options.select in mutant.name)
    problems = missing_snippets(ROOT, chosen)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems or options.check:
        return 1 if problems else 0
    failures = 0
    with tempfile.TemporaryDirectory(prefix="sparsecoll-mutants-") as directory:
        copy = Path(directory) / "tree"
        shutil.copytree(ROOT, copy, symlinks=True, ignore=_IGNORED)
        kernels = copy / "sparsecoll" / "kernels"
        if not kernels.exists():  # pyproject maps sparsecoll.kernels to kernels/: without this link an
            kernels.symlink_to("../kernels")  # editable install would import the unmutated kernels
        print(f"{'mutant':<55} {'verdict':<28} seconds")
        for mutant in chosen:
            verdict, seconds = run_mutant(mutant, copy, options.timeout)
            failures += verdict != "caught"
            print(f"{mutant.name:<55} {verdict:<28} {seconds:7.1f}", flush=True)
    print(f"{len(chosen) - failures} of {len(chosen)} mutants caught")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
