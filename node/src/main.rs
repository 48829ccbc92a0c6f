//! `flare-node`: one binary for every member of a federated-learning consortium.

fn main() -> std::process::ExitCode {
    flare_node::main_with_args(std::env::args_os())
}
