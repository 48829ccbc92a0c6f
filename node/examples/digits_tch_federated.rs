//! `digits_tch_local.rs` as a member of a federated job: the same program plus five lines
//! (`diff -w node/examples/digits_tch_local.rs node/examples/digits_tch_federated.rs`). Each
//! round it trains `--epochs` on the global model and sends its weights back.
//!
//! ```text
//! eval "$(scripts/install-libtorch.sh --env)"
//! cargo run --release --features torch --example digits_tch_federated -- --epochs 2 --site I \
//!     --topology FILE --name MEMBER --key KEY --data-dir DIR [--cnn]
//! ```
//! with a topology whose learner is `tch-mlp` (`tch-cnn` with `--cnn`); see docs/client-api.md.

mod common;

use tch::nn::{Module, OptimizerConfig};
use tch::{Device, Kind, Tensor, nn};

fn main() -> anyhow::Result<()> {
    let flare = flare_node::client::init()?;
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
    while let Some(input) = flare.receive()? {
        input.load_into(&vs)?;
        for _ in 0..epochs {
            for batch in Tensor::randperm(data.rows(), (Kind::Int64, vs.device())).split(32, 0) {
                let logits = net.forward(&data.x_train.index_select(0, &batch));
                opt.backward_step(&logits.cross_entropy_for_logits(&data.y_train.index_select(0, &batch)));
            }
        }
        let accuracy = tch::no_grad(|| net.forward(&data.x_test).accuracy_for_logits(&data.y_test));
        println!("test accuracy {:.4}", accuracy.double_value(&[]));
        flare.send(flare_node::client::FLModel::from_vars(&vs)?.with_samples(data.rows() as u64))?;
    }
    Ok(())
}
