"""Device tools' timer: seconds a call of fn, replayed from a CUDA graph (or eagerly), by CUDA events."""
import torch


def timed(fn, reps=20, graph=True):
    """fn once eagerly, then (graph) captured after a warm run on a side stream and replayed reps times."""
    fn()
    torch.cuda.synchronize()
    run = fn
    if graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):
            fn()
        run = gr.replay
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    run()
    ev[0].record()
    for _ in range(reps):
        run()
    ev[1].record()
    torch.cuda.synchronize()
    return ev[0].elapsed_time(ev[1]) / reps * 1e-3
