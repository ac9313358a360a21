"""The mae-lab command line (Typer)."""
import typer

app = typer.Typer(no_args_is_help=True, help="Declarative ablation studies for Masked Autoencoders.")
data_app = typer.Typer(no_args_is_help=True, help="Pack and inspect WebDataset shards.")
app.add_typer(data_app, name="data")
