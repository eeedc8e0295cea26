from madpo_ray.cli import app

app(prog_name="madpo")
