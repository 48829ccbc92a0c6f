//! What both digits examples share: one site's data as tensors, and the two networks.
//!
//! The data is the runtime's own shipped digits, dealt exactly as the `fedavg-digits-tch`
//! topology deals it (four sites, Dirichlet(0.5), data seed 0, model seed 1), so site `i` here
//! is client `i` of that job. Parameter names (`fc0`, `fc1`; `conv1`, `fc`) are the
//! topology's `tch-mlp` (hidden = [32]) and `tch-cnn` (16 channels) networks', so the global
//! model loads into them by name.

use flare_actors::data::Dataset;
use flare_actors::learner::digits::{DigitsFederation, LocalData};
use tch::{Device, Tensor, nn};

/// One site's training rows and the common test set, on `device`, shaped for the network.
pub struct SiteData {
    /// Training images (`[n, 64]` for the MLP, `[n, 1, 8, 8]` for the CNN).
    pub x_train: Tensor,
    /// Training labels.
    pub y_train: Tensor,
    /// Test images.
    pub x_test: Tensor,
    /// Test labels.
    pub y_test: Tensor,
}

impl SiteData {
    /// Training rows.
    pub fn rows(&self) -> i64 {
        self.y_train.size()[0]
    }
}

fn tensors(data: &Dataset, cnn: bool, device: Device) -> anyhow::Result<(Tensor, Tensor)> {
    let n = i64::try_from(data.len())?;
    let shape: &[i64] = if cnn { &[n, 1, 8, 8] } else { &[n, 64] };
    let x = Tensor::f_from_slice(data.features())?
        .f_reshape(shape)?
        .to_device(device);
    let labels: Vec<i64> = data.labels().iter().map(|&l| i64::from(l)).collect();
    Ok((x, Tensor::f_from_slice(&labels)?.to_device(device)))
}

/// Site `site`'s training rows (of four) and the test set.
pub fn site_data(site: usize, cnn: bool, device: Device) -> anyhow::Result<SiteData> {
    // A reproducible batch order (and initial weights) per site.
    tch::manual_seed(1 + i64::try_from(site)?);
    let fed = DigitsFederation::deal(4, 0.5, 0.2, 0)?;
    let shard = fed
        .shards
        .get(site)
        .ok_or_else(|| anyhow::anyhow!("site {site} of 4"))?;
    let local = LocalData::split(shard, 1, site)?;
    let (x_train, y_train) = tensors(&local.train, cnn, device)?;
    let (x_test, y_test) = tensors(&fed.test, cnn, device)?;
    Ok(SiteData {
        x_train,
        y_train,
        x_test,
        y_test,
    })
}

/// 64 pixels -> 32 ReLU -> 10 classes.
pub fn mlp(p: &nn::Path) -> nn::Sequential {
    nn::seq()
        .add(nn::linear(p / "fc0", 64, 32, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(p / "fc1", 32, 10, Default::default()))
}

/// 1x8x8 -> 16 3x3 filters, ReLU, 2x2 max-pool -> 10 classes.
pub fn cnn(p: &nn::Path) -> nn::Sequential {
    let padded = nn::ConvConfig {
        padding: 1,
        ..Default::default()
    };
    nn::seq()
        .add(nn::conv2d(p / "conv1", 1, 16, 3, padded))
        .add_fn(|x| x.relu().max_pool2d_default(2).flatten(1, -1))
        .add(nn::linear(p / "fc", 16 * 4 * 4, 10, Default::default()))
}

/// The value after `--name` on the command line, parsed.
pub fn arg<T: std::str::FromStr>(name: &str) -> Option<T> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
}
