//! A multi-layer perceptron classifier in plain Rust: ReLU hidden layers, softmax + cross-entropy,
//! mini-batch SGD (optional momentum and weight decay).
//!
//! Weights live in contiguous row-major `f32` buffers (`[out, in]`, PyTorch's layout). The three
//! products of a training step are written as fixed-order 8-lane dot products and `y += a·x`
//! loops, which the compiler vectorises without BLAS; the fixed order also makes results
//! bit-identical for the same inputs, seed and build.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{LearnerError, NamedTensor};
use crate::data::Dataset;

/// Rows evaluated per forward pass in [`Mlp::evaluate`].
const EVAL_CHUNK: usize = 256;

/// Largest parameter count a configuration may ask for (4 GiB of `f32`): refuses absurd layer
/// widths from a topology file before trying to allocate them.
const MAX_PARAMS: usize = 1 << 30;

/// Architecture and optimiser settings of an [`Mlp`].
#[derive(Debug, Clone, PartialEq)]
pub struct MlpConfig {
    /// Input features (64 for the digits).
    pub inputs: usize,
    /// Hidden layer widths, input side first; empty gives softmax regression.
    pub hidden: Vec<usize>,
    /// Output classes (10 for the digits).
    pub classes: usize,
    /// SGD step size.
    pub learning_rate: f32,
    /// Rows per mini-batch (the last batch of an epoch may be smaller).
    pub batch_size: usize,
    /// Heavy-ball momentum in `[0, 1)`; 0 turns it off.
    pub momentum: f32,
    /// L2 penalty added to weight (not bias) gradients; 0 turns it off.
    pub weight_decay: f32,
}

impl MlpConfig {
    /// A configuration with plain SGD defaults that train the digits well: learning rate 0.1,
    /// batch 32, no momentum, no weight decay.
    pub fn new(inputs: usize, hidden: Vec<usize>, classes: usize) -> Self {
        Self {
            inputs,
            hidden,
            classes,
            learning_rate: 0.1,
            batch_size: 32,
            momentum: 0.0,
            weight_decay: 0.0,
        }
    }

    fn validate(&self) -> Result<(), LearnerError> {
        let bad = |m: String| Err(LearnerError::InvalidConfig(m));
        if self.inputs == 0 || self.classes == 0 || self.hidden.contains(&0) {
            return bad(format!(
                "layer widths must be positive (inputs {}, hidden {:?}, classes {})",
                self.inputs, self.hidden, self.classes
            ));
        }
        let mut values: usize = 0;
        let mut inputs = self.inputs;
        for &outputs in self.hidden.iter().chain([&self.classes]) {
            values = inputs
                .checked_mul(outputs)
                .and_then(|w| w.checked_add(outputs))
                .and_then(|n| n.checked_add(values))
                .filter(|&n| n <= MAX_PARAMS)
                .ok_or_else(|| {
                    LearnerError::InvalidConfig(format!("more than {MAX_PARAMS} parameters ({:?})", self.hidden))
                })?;
            inputs = outputs;
        }
        if self.batch_size == 0 {
            return bad("batch size must be positive".into());
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad(format!(
                "learning rate {} must be finite and positive",
                self.learning_rate
            ));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return bad(format!("momentum {} must be in [0, 1)", self.momentum));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!(
                "weight decay {} must be finite and non-negative",
                self.weight_decay
            ));
        }
        Ok(())
    }
}

/// What one [`Mlp::train`] call did; `samples` is the weight FedAvg gives this member's update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainStats {
    /// Mean cross-entropy over the rows of the last epoch, as measured while training on them.
    pub loss: f64,
    /// Rows in the training set (not multiplied by epochs).
    pub samples: usize,
    /// SGD steps taken.
    pub steps: usize,
}

/// A model's quality on a data set (e.g. the common held-out test set).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Eval {
    /// Fraction of rows whose most probable class is the label.
    pub accuracy: f64,
    /// Mean cross-entropy.
    pub loss: f64,
    /// Rows evaluated.
    pub samples: usize,
}

/// One fully connected layer: `y = W x + b`, `W` row-major `[outputs, inputs]`.
#[derive(Debug, Clone, PartialEq)]
struct Dense {
    inputs: usize,
    outputs: usize,
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl Dense {
    fn zeros(inputs: usize, outputs: usize) -> Self {
        Self {
            inputs,
            outputs,
            weight: vec![0.0; inputs * outputs],
            bias: vec![0.0; outputs],
        }
    }

    /// `z = x Wᵀ + b` for a block of rows, with ReLU when `relu`.
    fn forward(&self, x: &[f32], z: &mut [f32], relu: bool) {
        for (xi, zi) in x.chunks_exact(self.inputs).zip(z.chunks_exact_mut(self.outputs)) {
            for ((zo, w), b) in zi.iter_mut().zip(self.weight.chunks_exact(self.inputs)).zip(&self.bias) {
                let v = b + dot(xi, w);
                *zo = if relu { v.max(0.0) } else { v };
            }
        }
    }
}

/// A fixed-order dot product with eight independent partial sums (vectorisable, reproducible;
/// the split networks use it too, so they compute bit for bit what the joined MLP does).
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// `y += a · x`.
#[inline]
pub(crate) fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// Per-row softmax cross-entropy of `logits` (`rows × classes`): returns the summed loss and the
/// number of rows whose arg-max is the label; when `delta` is given, writes `(p − onehot) · scale`.
fn softmax_xent(
    logits: &[f32],
    labels: &[u8],
    classes: usize,
    mut delta: Option<&mut [f32]>,
    scale: f32,
) -> (f64, usize) {
    let mut loss = 0.0f64;
    let mut correct = 0;
    for (i, (z, &y)) in logits.chunks_exact(classes).zip(labels).enumerate() {
        let y = usize::from(y);
        let (mut best, mut max) = (0, f32::NEG_INFINITY);
        for (c, &v) in z.iter().enumerate() {
            if v > max {
                (best, max) = (c, v);
            }
        }
        let sum: f32 = z.iter().map(|&v| (v - max).exp()).sum();
        let log_sum = sum.ln();
        loss += f64::from(log_sum - (z[y] - max));
        if best == y {
            correct += 1;
        }
        if let Some(d) = delta.as_deref_mut() {
            let row = &mut d[i * classes..(i + 1) * classes];
            for (dc, &v) in row.iter_mut().zip(z) {
                *dc = (v - max - log_sum).exp() * scale;
            }
            row[y] -= scale;
        }
    }
    (loss, correct)
}

/// Buffers for one mini-batch, allocated once per `train` call.
struct Scratch {
    /// Batch input rows, `batch × inputs`.
    input: Vec<f32>,
    /// Batch labels.
    labels: Vec<u8>,
    /// `outs[l]`: output of layer `l` (after ReLU for hidden layers), `batch × outputs_l`.
    outs: Vec<Vec<f32>>,
    /// Gradient w.r.t. the current layer's output, and the one being built for the layer below.
    delta: Vec<f32>,
    back: Vec<f32>,
    /// Parameter gradients, same shapes as the layers.
    grads: Vec<Dense>,
}

impl Scratch {
    fn new(layers: &[Dense], batch: usize) -> Self {
        let widest = layers.iter().map(|l| l.inputs.max(l.outputs)).max().unwrap_or(0);
        Self {
            input: vec![0.0; batch * layers.first().map_or(0, |l| l.inputs)],
            labels: Vec::with_capacity(batch),
            outs: layers.iter().map(|l| vec![0.0; batch * l.outputs]).collect(),
            delta: vec![0.0; batch * widest],
            back: vec![0.0; batch * widest],
            grads: layers.iter().map(|l| Dense::zeros(l.inputs, l.outputs)).collect(),
        }
    }
}

/// Runs `rows` rows of `input` through `layers`, leaving each layer's output in `outs`.
fn forward(layers: &[Dense], input: &[f32], outs: &mut [Vec<f32>], rows: usize) {
    let last = layers.len().saturating_sub(1);
    for (l, layer) in layers.iter().enumerate() {
        let (done, rest) = outs.split_at_mut(l);
        let x = if l == 0 {
            &input[..rows * layer.inputs]
        } else {
            &done[l - 1][..rows * layer.inputs]
        };
        layer.forward(x, &mut rest[0][..rows * layer.outputs], l < last);
    }
}

/// A multi-layer perceptron classifier: `inputs → hidden… → classes`, ReLU between layers,
/// softmax at the end. With no hidden layer it is multinomial logistic (softmax) regression.
///
/// Its parameters are `layers.{i}.weight` (`[out, in]`) and `layers.{i}.bias` (`[out]`) for each
/// layer `i` from the input side: the names and layouts PyTorch gives an `nn.ModuleList` of
/// `nn.Linear` called `layers`, so a saved model loads into such a PyTorch module as it is.
#[derive(Debug, Clone)]
pub struct Mlp {
    config: MlpConfig,
    layers: Vec<Dense>,
    /// Momentum buffers; empty until the first step with momentum.
    velocity: Vec<Dense>,
}

impl Mlp {
    /// A new network with seeded initialisation: He-uniform weights (`±√(6/in)`) for layers followed
    /// by ReLU, Glorot-uniform (`±√(6/(in+out))`) for the output layer, zero biases. The same seed
    /// gives the same model on every member, which is how a federation can agree on a start.
    pub fn new(config: MlpConfig, seed: u64) -> Result<Self, LearnerError> {
        config.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut widths = Vec::with_capacity(config.hidden.len() + 2);
        widths.push(config.inputs);
        widths.extend_from_slice(&config.hidden);
        widths.push(config.classes);
        let last = widths.len() - 2;
        let layers = widths
            .windows(2)
            .enumerate()
            .map(|(l, w)| {
                let (inputs, outputs) = (w[0], w[1]);
                let limit = if l < last {
                    (6.0 / inputs as f32).sqrt()
                } else {
                    (6.0 / (inputs + outputs) as f32).sqrt()
                };
                let mut layer = Dense::zeros(inputs, outputs);
                for v in &mut layer.weight {
                    *v = rng.random_range(-limit..limit);
                }
                layer
            })
            .collect();
        Ok(Self {
            config,
            layers,
            velocity: Vec::new(),
        })
    }

    /// The configuration the network was built with.
    pub fn config(&self) -> &MlpConfig {
        &self.config
    }

    /// Changes the optimiser settings (e.g. a per-round learning rate) but not the architecture.
    pub fn set_optimizer(
        &mut self,
        learning_rate: f32,
        batch_size: usize,
        momentum: f32,
        weight_decay: f32,
    ) -> Result<(), LearnerError> {
        let config = MlpConfig {
            learning_rate,
            batch_size,
            momentum,
            weight_decay,
            ..self.config.clone()
        };
        config.validate()?;
        self.config = config;
        Ok(())
    }

    /// Total number of trainable values (to size benchmarks and report model bytes).
    pub fn num_params(&self) -> usize {
        self.layers.iter().map(|l| l.weight.len() + l.bias.len()).sum()
    }

    /// Names and shapes of the parameters, sorted by name, without copying values.
    fn layout(&self) -> Vec<(String, Vec<usize>, usize, bool)> {
        let mut out: Vec<_> = self
            .layers
            .iter()
            .enumerate()
            .flat_map(|(i, l)| {
                [
                    (format!("layers.{i}.weight"), vec![l.outputs, l.inputs], i, true),
                    (format!("layers.{i}.bias"), vec![l.outputs], i, false),
                ]
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// A copy of the parameters as named tensors, sorted by name (the canonical model order).
    pub fn params(&self) -> Vec<NamedTensor> {
        self.layout()
            .into_iter()
            .map(|(name, shape, i, is_weight)| {
                let layer = &self.layers[i];
                let values = if is_weight {
                    layer.weight.clone()
                } else {
                    layer.bias.clone()
                };
                NamedTensor { name, shape, values }
            })
            .collect()
    }

    /// Replaces every parameter with the tensor of the same name (any order), e.g. the global model
    /// a round starts from. All tensors are checked before any is copied, so on error the model is
    /// unchanged. Resets momentum: optimiser state from another model would be stale.
    ///
    /// Errors: a missing, unknown or repeated name, a wrong shape, or values that do not fill the shape.
    pub fn set_params(&mut self, params: &[NamedTensor]) -> Result<(), LearnerError> {
        let layout = self.layout();
        let mut found: Vec<Option<&NamedTensor>> = vec![None; layout.len()];
        for t in params {
            let slot = layout
                .iter()
                .position(|(name, ..)| *name == t.name)
                .ok_or_else(|| LearnerError::UnknownParam { name: t.name.clone() })?;
            if found[slot].is_some() {
                return Err(LearnerError::DuplicateParam { name: t.name.clone() });
            }
            let (name, shape, ..) = &layout[slot];
            if t.shape != *shape {
                return Err(LearnerError::ShapeMismatch {
                    name: name.clone(),
                    expected: shape.clone(),
                    found: t.shape.clone(),
                });
            }
            if t.values.len() != t.numel() {
                return Err(LearnerError::ValueCount {
                    name: name.clone(),
                    shape: t.shape.clone(),
                    needed: t.numel(),
                    len: t.values.len(),
                });
            }
            found[slot] = Some(t);
        }
        let mut tensors = Vec::with_capacity(layout.len());
        for ((name, ..), t) in layout.iter().zip(&found) {
            tensors.push(t.ok_or_else(|| LearnerError::MissingParam { name: name.clone() })?);
        }
        for ((_, _, i, is_weight), t) in layout.iter().zip(tensors) {
            let layer = &mut self.layers[*i];
            let dst = if *is_weight { &mut layer.weight } else { &mut layer.bias };
            dst.copy_from_slice(&t.values);
        }
        self.velocity.clear();
        Ok(())
    }

    fn check_data(&self, data: &Dataset) -> Result<(), LearnerError> {
        if data.dim() != self.config.inputs {
            return Err(LearnerError::DataMismatch(format!(
                "rows have {} features, the model takes {}",
                data.dim(),
                self.config.inputs
            )));
        }
        if data.classes() > self.config.classes {
            return Err(LearnerError::DataMismatch(format!(
                "data has {} classes, the model predicts {}",
                data.classes(),
                self.config.classes
            )));
        }
        if data.is_empty() {
            return Err(LearnerError::DataMismatch("the data set is empty".into()));
        }
        Ok(())
    }

    /// Forward and backward pass over the `rows` rows in `s.input`/`s.labels`: leaves the gradient
    /// of the mean batch loss in `s.grads` and returns the summed loss.
    fn gradients(&self, s: &mut Scratch, rows: usize) -> f64 {
        let layers = &self.layers;
        let Some(top) = layers.len().checked_sub(1) else {
            return 0.0;
        };
        forward(layers, &s.input, &mut s.outs, rows);
        let classes = layers[top].outputs;
        let delta = &mut s.delta[..rows * classes];
        let (loss, _) = softmax_xent(
            &s.outs[top][..rows * classes],
            &s.labels,
            classes,
            Some(delta),
            1.0 / rows as f32,
        );
        for l in (0..=top).rev() {
            let layer = &layers[l];
            let (n_in, n_out) = (layer.inputs, layer.outputs);
            let x = if l == 0 {
                &s.input[..rows * n_in]
            } else {
                &s.outs[l - 1][..rows * n_in]
            };
            let delta = &s.delta[..rows * n_out];
            let g = &mut s.grads[l];
            g.weight.fill(0.0);
            g.bias.fill(0.0);
            for (xi, di) in x.chunks_exact(n_in).zip(delta.chunks_exact(n_out)) {
                for ((gw, gb), &d) in g.weight.chunks_exact_mut(n_in).zip(&mut g.bias).zip(di) {
                    if d != 0.0 {
                        *gb += d;
                        axpy(gw, d, xi);
                    }
                }
            }
            if l == 0 {
                break;
            }
            let back = &mut s.back[..rows * n_in];
            back.fill(0.0);
            for ((bi, di), xi) in back
                .chunks_exact_mut(n_in)
                .zip(delta.chunks_exact(n_out))
                .zip(x.chunks_exact(n_in))
            {
                for (w, &d) in layer.weight.chunks_exact(n_in).zip(di) {
                    if d != 0.0 {
                        axpy(bi, d, w);
                    }
                }
                // ReLU: x is the previous layer's post-activation output; zero where it was cut.
                for (b, &xv) in bi.iter_mut().zip(xi) {
                    if xv <= 0.0 {
                        *b = 0.0;
                    }
                }
            }
            std::mem::swap(&mut s.delta, &mut s.back);
        }
        loss
    }

    /// One SGD step from the gradients in `grads`.
    fn step(&mut self, grads: &mut [Dense]) {
        let MlpConfig {
            learning_rate: lr,
            momentum,
            weight_decay: wd,
            ..
        } = self.config;
        if momentum > 0.0 && self.velocity.len() != self.layers.len() {
            self.velocity = self.layers.iter().map(|l| Dense::zeros(l.inputs, l.outputs)).collect();
        }
        for (l, (layer, g)) in self.layers.iter_mut().zip(grads.iter_mut()).enumerate() {
            if wd > 0.0 {
                axpy(&mut g.weight, wd, &layer.weight);
            }
            if momentum > 0.0 {
                let v = &mut self.velocity[l];
                for (vv, gv) in v.weight.iter_mut().zip(&g.weight).chain(v.bias.iter_mut().zip(&g.bias)) {
                    *vv = momentum * *vv + gv;
                }
                axpy(&mut layer.weight, -lr, &v.weight);
                axpy(&mut layer.bias, -lr, &v.bias);
            } else {
                axpy(&mut layer.weight, -lr, &g.weight);
                axpy(&mut layer.bias, -lr, &g.bias);
            }
        }
    }

    /// Trains for `epochs` passes over `data` with mini-batch SGD, rows shuffled by `rng` each
    /// epoch. Pass a seeded RNG (e.g. `ChaCha8Rng::seed_from_u64(seed ^ round)`) for reproducible runs.
    ///
    /// Errors if the data's feature dimension differs from the model's input, it has more classes
    /// than the model, or it is empty.
    pub fn train<R: Rng + ?Sized>(
        &mut self,
        data: &Dataset,
        epochs: usize,
        rng: &mut R,
    ) -> Result<TrainStats, LearnerError> {
        self.check_data(data)?;
        let batch = self.config.batch_size.min(data.len());
        let dim = data.dim();
        let mut s = Scratch::new(&self.layers, batch);
        let mut grads = Vec::new();
        let mut order: Vec<usize> = (0..data.len()).collect();
        let (mut steps, mut epoch_loss) = (0, 0.0);
        for _ in 0..epochs {
            order.shuffle(rng);
            epoch_loss = 0.0;
            for chunk in order.chunks(batch) {
                s.labels.clear();
                for (k, &r) in chunk.iter().enumerate() {
                    s.input[k * dim..(k + 1) * dim].copy_from_slice(&data.features()[r * dim..(r + 1) * dim]);
                    s.labels.push(data.labels()[r]);
                }
                epoch_loss += self.gradients(&mut s, chunk.len());
                std::mem::swap(&mut grads, &mut s.grads);
                self.step(&mut grads);
                std::mem::swap(&mut grads, &mut s.grads);
                steps += 1;
            }
        }
        let loss = if epochs == 0 {
            0.0
        } else {
            epoch_loss / data.len() as f64
        };
        Ok(TrainStats {
            loss,
            samples: data.len(),
            steps,
        })
    }

    /// Accuracy and mean cross-entropy on `data` (e.g. the common held-out test set).
    pub fn evaluate(&self, data: &Dataset) -> Result<Eval, LearnerError> {
        self.check_data(data)?;
        let Some(top) = self.layers.len().checked_sub(1) else {
            return Err(LearnerError::InvalidConfig("the network has no layers".into()));
        };
        let dim = data.dim();
        let classes = self.layers[top].outputs;
        let rows = EVAL_CHUNK.min(data.len());
        let mut outs: Vec<Vec<f32>> = self.layers.iter().map(|l| vec![0.0; rows * l.outputs]).collect();
        let (mut loss, mut correct) = (0.0, 0);
        for (x, y) in data
            .features()
            .chunks(EVAL_CHUNK * dim)
            .zip(data.labels().chunks(EVAL_CHUNK))
        {
            forward(&self.layers, x, &mut outs, y.len());
            let (l, c) = softmax_xent(&outs[top][..y.len() * classes], y, classes, None, 0.0);
            loss += l;
            correct += c;
        }
        let n = data.len() as f64;
        Ok(Eval {
            accuracy: correct as f64 / n,
            loss: loss / n,
            samples: data.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Dataset, digits, dirichlet_partition, train_test_split};

    fn random_data(rows: usize, dim: usize, classes: usize, seed: u64) -> Dataset {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let features = (0..rows * dim).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let labels = (0..rows).map(|_| rng.random_range(0..classes as u8)).collect();
        Dataset::new(features, labels, dim, classes).expect("new")
    }

    /// Mean loss of `net` on all of `data` (the function the gradients are of).
    fn mean_loss(net: &Mlp, data: &Dataset) -> f64 {
        net.evaluate(data).expect("evaluate").loss
    }

    /// Analytic gradient of the mean loss over all of `data`, as named tensors in `params()` order.
    fn analytic(net: &Mlp, data: &Dataset) -> Vec<NamedTensor> {
        let mut s = Scratch::new(&net.layers, data.len());
        s.input.copy_from_slice(data.features());
        s.labels.extend_from_slice(data.labels());
        net.gradients(&mut s, data.len());
        let mut shadow = net.clone();
        shadow.layers = s.grads;
        shadow.params()
    }

    /// Central finite differences of the mean loss, one value at a time.
    fn numeric(net: &Mlp, data: &Dataset, eps: f32) -> Vec<NamedTensor> {
        let base = net.params();
        let mut out = base.clone();
        let mut probe = net.clone();
        for t in 0..base.len() {
            for k in 0..base[t].values.len() {
                let mut p = base.clone();
                p[t].values[k] += eps;
                probe.set_params(&p).expect("set_params");
                let up = mean_loss(&probe, data);
                p[t].values[k] -= 2.0 * eps;
                probe.set_params(&p).expect("set_params");
                let down = mean_loss(&probe, data);
                out[t].values[k] = ((up - down) / (2.0 * f64::from(eps))) as f32;
            }
        }
        out
    }

    /// Every analytic value within `1e-3 + 1e-2·|numeric|` of its finite difference.
    fn compare(analytic: &[NamedTensor], numeric: &[NamedTensor]) -> Result<(), String> {
        for (a, n) in analytic.iter().zip(numeric) {
            assert_eq!(a.name, n.name);
            for (k, (&x, &y)) in a.values.iter().zip(&n.values).enumerate() {
                if (x - y).abs() > 1e-3 + 1e-2 * y.abs() {
                    return Err(format!("{}[{k}]: analytic {x}, numeric {y}", a.name));
                }
            }
        }
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() {
        let data = random_data(6, 5, 3, 11);
        for hidden in [vec![], vec![4], vec![4, 3]] {
            let mut net = Mlp::new(MlpConfig::new(5, hidden.clone(), 3), 5).expect("new");
            // Non-zero biases so every code path carries weight.
            let mut p = net.params();
            for t in &mut p {
                for (k, v) in t.values.iter_mut().enumerate() {
                    if t.name.ends_with("bias") {
                        // Never exactly 0: a unit whose inputs are all cut by ReLU would sit on the kink.
                        *v = 0.13 * k as f32 - 0.07;
                    }
                }
            }
            net.set_params(&p).expect("set_params");
            let a = analytic(&net, &data);
            let n = numeric(&net, &data, 1e-3);
            assert!(
                a.iter().flat_map(|t| &t.values).any(|v| v.abs() > 1e-2),
                "gradients are not trivial"
            );
            compare(&a, &n).unwrap_or_else(|e| panic!("hidden {hidden:?}: {e}"));
            // The check can fail: a slightly wrong gradient is caught.
            for t in 0..a.len() {
                let mut wrong = a.clone();
                wrong[t].values[0] += 0.01;
                assert!(
                    compare(&wrong, &n).is_err(),
                    "hidden {hidden:?}: corrupted {} passed",
                    a[t].name
                );
            }
        }
    }

    #[test]
    fn params_are_named_sorted_and_round_trip() {
        let net = Mlp::new(MlpConfig::new(64, vec![32, 16], 10), 1).expect("new");
        let p = net.params();
        let names: Vec<&str> = p.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "layers.0.bias",
                "layers.0.weight",
                "layers.1.bias",
                "layers.1.weight",
                "layers.2.bias",
                "layers.2.weight"
            ]
        );
        assert_eq!(p[1].shape, vec![32, 64]);
        assert_eq!(p[5].shape, vec![10, 16]);
        assert_eq!(net.num_params(), 64 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10);
        let mut other = Mlp::new(MlpConfig::new(64, vec![32, 16], 10), 2).expect("new");
        assert_ne!(other.params(), p);
        let mut shuffled = p.clone();
        shuffled.reverse();
        other.set_params(&shuffled).expect("set_params");
        assert_eq!(other.params(), p);
        // Same seed, same model.
        assert_eq!(
            Mlp::new(MlpConfig::new(64, vec![32, 16], 10), 1).expect("new").params(),
            p
        );
    }

    #[test]
    fn set_params_rejects_bad_models_and_changes_nothing() {
        let mut net = Mlp::new(MlpConfig::new(4, vec![3], 2), 1).expect("new");
        let good = net.params();
        let mut p = good.clone();
        p[1].shape = vec![4, 3];
        assert_eq!(
            net.set_params(&p),
            Err(LearnerError::ShapeMismatch {
                name: "layers.0.weight".into(),
                expected: vec![3, 4],
                found: vec![4, 3]
            })
        );
        let mut p = good.clone();
        p[0].values.push(1.0);
        assert!(matches!(net.set_params(&p), Err(LearnerError::ValueCount { .. })));
        let mut p = good.clone();
        p.remove(2);
        assert_eq!(
            net.set_params(&p),
            Err(LearnerError::MissingParam {
                name: "layers.1.bias".into()
            })
        );
        let mut p = good.clone();
        p.push(NamedTensor::zeros("layers.9.bias", vec![2]));
        assert_eq!(
            net.set_params(&p),
            Err(LearnerError::UnknownParam {
                name: "layers.9.bias".into()
            })
        );
        let mut p = good.clone();
        p.push(good[0].clone());
        assert!(matches!(net.set_params(&p), Err(LearnerError::DuplicateParam { .. })));
        // A partial update that fails late leaves the model untouched.
        let mut p: Vec<NamedTensor> = good
            .iter()
            .map(|t| NamedTensor::zeros(t.name.clone(), t.shape.clone()))
            .collect();
        p[3].shape = vec![1];
        assert!(net.set_params(&p).is_err());
        assert_eq!(net.params(), good);
    }

    #[test]
    fn bad_config_and_mismatched_data_are_errors() {
        for c in [
            MlpConfig {
                hidden: vec![0],
                ..MlpConfig::new(4, vec![], 2)
            },
            MlpConfig {
                batch_size: 0,
                ..MlpConfig::new(4, vec![], 2)
            },
            MlpConfig {
                learning_rate: f32::NAN,
                ..MlpConfig::new(4, vec![], 2)
            },
            MlpConfig {
                momentum: 1.0,
                ..MlpConfig::new(4, vec![], 2)
            },
            MlpConfig::new(0, vec![], 2),
            MlpConfig::new(64, vec![1 << 20, 1 << 20], 10),
            MlpConfig::new(64, vec![usize::MAX], 10),
        ] {
            assert!(matches!(Mlp::new(c, 0), Err(LearnerError::InvalidConfig(_))));
        }
        let mut net = Mlp::new(MlpConfig::new(4, vec![], 2), 0).expect("new");
        let data = random_data(5, 3, 2, 0);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert!(matches!(
            net.train(&data, 1, &mut rng),
            Err(LearnerError::DataMismatch(_))
        ));
        assert!(matches!(
            net.evaluate(&random_data(5, 4, 3, 0)),
            Err(LearnerError::DataMismatch(_))
        ));
    }

    #[test]
    fn training_is_reproducible() {
        let data = random_data(50, 8, 3, 1);
        let run = || {
            let mut c = MlpConfig::new(8, vec![6], 3);
            c.momentum = 0.9;
            c.weight_decay = 1e-3;
            c.batch_size = 7;
            let mut net = Mlp::new(c, 3).expect("new");
            let stats = net.train(&data, 3, &mut ChaCha8Rng::seed_from_u64(9)).expect("train");
            (net.params(), stats)
        };
        let (p, stats) = run();
        assert_eq!(run().0, p);
        assert_eq!(stats.samples, 50);
        assert_eq!(stats.steps, 3 * 8);
        assert!(stats.loss.is_finite());
    }

    /// Trains a fresh net on `train` and returns its test accuracy.
    fn fit(hidden: Vec<usize>, train: &Dataset, test: &Dataset, epochs: usize, seed: u64) -> Eval {
        let mut c = MlpConfig::new(64, hidden, 10);
        c.learning_rate = 0.1;
        c.batch_size = 32;
        let mut net = Mlp::new(c, seed).expect("new");
        let before = net.evaluate(test).expect("evaluate");
        let stats = net
            .train(train, epochs, &mut ChaCha8Rng::seed_from_u64(seed))
            .expect("train");
        let after = net.evaluate(test).expect("evaluate");
        assert!(after.loss < before.loss, "loss did not fall: {before:?} -> {after:?}");
        assert!(stats.loss.is_finite());
        after
    }

    #[test]
    fn central_training_learns_the_digits() {
        let (train, test) = train_test_split(&digits().expect("digits"), 0.2, 0).expect("split");
        let softmax = fit(vec![], &train, &test, 20, 1);
        let mlp = fit(vec![32], &train, &test, 20, 1);
        eprintln!("central softmax: {softmax:?}; central [32]: {mlp:?}");
        assert!(softmax.accuracy >= 0.90, "softmax regression: {softmax:?}");
        assert!(mlp.accuracy >= 0.90, "[32]: {mlp:?}");
    }

    #[test]
    fn local_only_training_on_skewed_shards_is_worse() {
        let (train, test) = train_test_split(&digits().expect("digits"), 0.2, 0).expect("split");
        let central = fit(vec![32], &train, &test, 20, 1);
        let parts = dirichlet_partition(&train, 4, 0.5, 10, 0).expect("dirichlet_partition");
        let local: Vec<Eval> = parts
            .iter()
            .map(|p| fit(vec![32], &train.subset(p).expect("subset"), &test, 20, 1))
            .collect();
        let mean = local.iter().map(|e| e.accuracy).sum::<f64>() / local.len() as f64;
        let sizes: Vec<usize> = parts.iter().map(Vec::len).collect();
        eprintln!(
            "central [32] {:.4}; local-only {:?} (sizes {sizes:?}), mean {mean:.4}",
            central.accuracy,
            local.iter().map(|e| e.accuracy).collect::<Vec<_>>()
        );
        assert!(
            mean + 0.05 < central.accuracy,
            "mean local-only {mean} vs central {}",
            central.accuracy
        );
    }
}
