"""Training curves: JSON lines always, TensorBoard when installed, a PNG plot when matplotlib is."""
import json
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss_curve.png"


class MetricsLog:
    def __init__(self, output_dir, writer_dir, say=print):
        self.path = Path(output_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            say(f"curves: {self.path} (TensorBoard is not installed: `pip install tensorboard` to get "
                f"curves in {writer_dir})")
        else:
            self.writer = SummaryWriter(writer_dir)
            say(f"curves: {self.path} and TensorBoard in {writer_dir}")

    def log(self, step, **values):
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer:
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(name, value, step)
            self.writer.flush()

    def read(self):
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line]

    def truncate_after(self, step):
        """On resume: forget what an interrupted run logged after its checkpoint."""
        rows = [r for r in self.read() if r["step"] <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    def plot(self):
        """Write the loss curves to a PNG beside the metrics; return its path, or None without matplotlib."""
        try:
            import matplotlib
        except ImportError:
            return None
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.read()
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for key, label in (("train_loss", "training loss"), ("eval_loss", "held-out loss")):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points, strict=True), label=label, marker="o" if key == "eval_loss" else None)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats per token)")
        ax.grid(alpha=0.3)
        ax.legend()
        path = self.path.with_name(PLOT_FILE)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def close(self):
        if self.writer:
            self.writer.close()
