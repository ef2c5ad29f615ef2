# Included (hidden) at the top of each tutorial that draws: puts a matplotlib Figure into the page.
import io

import matplotlib

matplotlib.use("Agg")


def show(fig):
    """Print ``fig`` as inline SVG (the page's HTML); in your own code use ``fig.savefig(path)``."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    svg = buf.getvalue()
    print(svg[svg.index("<svg") :])
