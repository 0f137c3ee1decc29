"""Outside references for `moe-serve bench`: `transformers.generate` and llama.cpp's `llama-server`.

transformers runs in this process, batched as a user would: batches of the concurrency, left padding,
greedy, each batch generating up to its longest requested output; only requested tokens count.

llama.cpp is built for the benchmark from the sources vendored in the `llama-cpp-python` source
package (`pip download`, then cmake), the checkpoint is converted with its `convert_hf_to_gguf.py` to
float32 and bfloat16 GGUF, and `llama-server` is driven over its OpenAI endpoint with the same
token-id prompts and `ignore_eos`. Nothing of llama.cpp is committed; everything lives in the work dir.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from bench.driver import Result
from bench.workload import Request
from moe_serve.ports import free_port


def run_transformers(model_dir: Path, requests: list[Request], concurrency: int, dtype: torch.dtype,
                     device: str = "cpu") -> tuple[list[Result], float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    results: list[Result] = []
    started = time.perf_counter()
    for i in range(0, len(requests), concurrency):
        results += _transformers_batch(model, requests[i:i + concurrency])
    return results, time.perf_counter() - started


def _transformers_batch(model, batch: list[Request]) -> list[Result]:
    width = max(len(r.prompt_ids) for r in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, request in enumerate(batch):  # left padding, as generate() wants for decoder-only models
        ids[row, width - len(request.prompt_ids):] = torch.tensor(request.prompt_ids)
        mask[row, width - len(request.prompt_ids):] = 1
    stamps: list[float] = []

    class Clock:  # records when each generated token's logits are ready
        def __call__(self, input_ids, scores):
            if scores.is_cuda:  # kernels run ahead of the host: the logits are ready once they are done
                torch.cuda.synchronize(scores.device)
            stamps.append(time.perf_counter())
            return scores

    new = max(r.max_tokens for r in batch)
    ids, mask = ids.to(model.device), mask.to(model.device)
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       pad_token_id=0, logits_processor=[Clock()])
    out = []
    for request in batch:
        own = stamps[:request.max_tokens]  # a request is done at its own last token, not the batch's
        out.append(Result(ttft=own[0] - started, e2e=own[-1] - started, output_tokens=request.max_tokens,
                          itl=[b - a for a, b in itertools.pairwise(own)], repeat=request.repeat))
    return out


# -- llama.cpp -------------------------------------------------------------------------------------

def llama_cpp_source(work: Path) -> Path:
    """The llama.cpp tree vendored in llama-cpp-python's source package (downloaded once)."""
    existing = sorted(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if existing:
        return existing[-1]
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "llama-cpp-python", "--no-binary", ":all:", "--no-deps",
                    "-d", str(work)], check=True)
    archive = sorted(work.glob("llama_cpp_python-*.tar.gz"))[-1]
    with tarfile.open(archive) as tar:
        tar.extractall(work, filter="data")
    return sorted(work.glob("llama_cpp_python-*/vendor/llama.cpp"))[-1]


def llama_server(work: Path) -> Path:
    source = llama_cpp_source(work)
    binary = source / "build" / "bin" / "llama-server"
    if not binary.exists():
        subprocess.run(["cmake", "-B", "build", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
                        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON"],
                       cwd=source, check=True)
        subprocess.run(["cmake", "--build", "build", "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
                       cwd=source, check=True)
    return binary


# The converter refuses tokenizers whose pre-tokenizer hash it does not know; ours are byte-level BPE,
# which is what "gpt-2" means to it. Prompts are sent as token ids, so only the weights matter.
CONVERT = """
import runpy, sys
sys.path.insert(0, ".")
import conversion.base as base
for name in dir(base):
    cls = getattr(base, name)
    if isinstance(cls, type) and hasattr(cls, "get_vocab_base_pre"):
        cls.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[1:]]
runpy.run_path("convert_hf_to_gguf.py", run_name="__main__")
"""


def gguf(work: Path, model_dir: Path, outtype: str) -> Path:
    source = llama_cpp_source(work)
    out = work / f"{model_dir.resolve().name}-{outtype}.gguf"
    if not out.exists():
        # The converter imports sentencepiece before it looks for a tokenizer.model, even for BPE tokenizers.
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", str(source / "gguf-py"), "sentencepiece"],
                       check=True)
        subprocess.run([sys.executable, "-c", CONVERT, str(model_dir.resolve()), "--outtype", outtype, "--outfile",
                        str(out)], cwd=source, check=True)
    return out


@dataclass
class LlamaServer:
    process: subprocess.Popen
    url: str

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def peak_rss_mib(self) -> dict[str, float]:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
        return {"llama-server": round(kib / 1024, 1)}


def start_llama_server(work: Path, model_dir: Path, outtype: str, parallel: int, context_per_slot: int
                       ) -> LlamaServer:
    binary, model = llama_server(work), gguf(work, model_dir, outtype)
    port = free_port()
    log = (work / f"llama-server-{outtype}.log").open("w")
    argv = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-t", str(os.cpu_count() or 2),
            "-np", str(parallel), "-c", str(parallel * context_per_slot), "--no-webui"]
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return LlamaServer(process, url)
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"llama-server did not start; see {log.name}")
        time.sleep(0.5)


def have_build_tools() -> bool:
    return shutil.which("cmake") is not None and shutil.which("c++") is not None


def describe(work: Path) -> dict:
    source = sorted(work.glob("llama_cpp_python-*"))
    return {"llama_cpp_python": source[-1].name if source else None, "args": json.dumps(sys.argv)}
