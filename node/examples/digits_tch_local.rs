//! A plain `tch` training loop on one site's digits: no federation. `digits_tch_federated.rs`
//! is the same program as a member of a federated job, five lines longer
//! (`diff -w node/examples/digits_tch_local.rs node/examples/digits_tch_federated.rs`).
//!
//! ```text
//! eval "$(scripts/install-libtorch.sh --env)"
//! cargo run --release --features torch --example digits_tch_local -- [--cnn] [--site 0..3] [--epochs N]
//! ```

mod common;

use tch::nn::{Module, OptimizerConfig};
use tch::{Device, Kind, Tensor, nn};

fn main() -> anyhow::Result<()> {
    let cnn = std::env::args().any(|a| a == "--cnn");
    let epochs: usize = common::arg("--epochs").unwrap_or(40);
    let data = common::site_data(common::arg("--site").unwrap_or(0), cnn, Device::cuda_if_available())?;
    let vs = nn::VarStore::new(Device::cuda_if_available());
    let net = if cnn {
        common::cnn(&vs.root())
    } else {
        common::mlp(&vs.root())
    };
    let mut opt = nn::Sgd::default().build(&vs, 0.1)?;
    for _ in 0..epochs {
        for batch in Tensor::randperm(data.rows(), (Kind::Int64, vs.device())).split(32, 0) {
            let logits = net.forward(&data.x_train.index_select(0, &batch));
            opt.backward_step(&logits.cross_entropy_for_logits(&data.y_train.index_select(0, &batch)));
        }
    }
    let accuracy = tch::no_grad(|| net.forward(&data.x_test).accuracy_for_logits(&data.y_test));
    println!("test accuracy {:.4}", accuracy.double_value(&[]));
    Ok(())
}
