"""Replace matched patterns by calls of ``fastlayers.functional`` in a Dynamo FX graph.

The fused call is inserted just before the pattern's last node (all its inputs exist
there) and takes over that node's users; the pattern's other nodes are erased once
unused. The functional ops validate, follow autocast and the fp32 precision switches and,
when traced by aot_autograd, become the ``fastlayers::<op>_fwd`` custom ops with their
backward, so Inductor compiles the rest of the graph around them.
"""
from typing import List

import torch

from .. import functional
from .patterns import Match


def linear_relu(x, weight, bias):
    """relu(F.linear(x, weight, bias)): weight [out, in]."""
    return functional.linear_relu(x, weight, bias)


def matmul_bias_relu(x, weight, bias):
    """relu(x @ weight + bias): weight [in, out] (the seed's MyLinear layout)."""
    return functional.linear_relu(x, weight.t(), bias)


def addmm_relu(bias, x, weight):
    """relu(torch.addmm(bias, x, weight)): weight [in, out]."""
    return functional.linear_relu(x, weight.t(), bias)


def fixed_hidden(x, weight, c):
    """relu(x @ weight + c), weight frozen [in, out], c a Python float."""
    return functional.fixed_hidden(x, weight, c)


def centered(x, dim):
    """x - x.mean() (dim None) or x - x.mean(dim, keepdim=True)."""
    return functional.centered(x, dim)


FUSED = {f.__name__: f for f in (linear_relu, matmul_bias_relu, addmm_relu, fixed_hidden,
                                  centered)}


def apply_matches(gm: torch.fx.GraphModule, matches: List[Match]) -> int:
    """Rewrite ``gm`` in place for every match with ``reason is None``; returns how many."""
    graph = gm.graph
    done = 0
    replaced = {}  # a node an earlier fusion replaced -> its fused node
    for m in matches:
        if m.reason is not None:
            continue
        last = m.nodes[-1]
        args = tuple(replaced.get(a, a) if isinstance(a, torch.fx.Node) else a for a in m.args)
        with graph.inserting_before(last):
            fused = graph.call_function(FUSED[m.fn], args)
        replaced[last] = fused
        fused.meta.update(last.meta)  # example_value, stack_trace, nn_module_stack, ...
        last.replace_all_uses_with(fused)
        for node in reversed(m.nodes):
            if not node.users:
                graph.erase_node(node)
        done += 1
    if done:
        graph.lint()
        gm.recompile()
    return done
