"""One module per pipeline stage. The training stages (sft, reward, policy) each expose
`train_<stage>(cfg, session, *, model_dir, out)`, run through `launcher.launch` wherever they run
(a Ray Train worker, one process, a compare task, a Tune trial); `outputs` is their shared tail."""
