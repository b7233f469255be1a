//! The linear algebra GPTQ needs: the upper Cholesky factor of a damped H's inverse, from one
//! factorisation of the order-reversed matrix.
use ndarray::Array2;

/// GPTQ's damping: λ = DAMP · mean(diag H) added to H's diagonal, so H inverts when inputs are
/// collinear or constant on the calibration rows.
const DAMP: f64 = 0.01;

/// The upper-triangular U with (H + λI)⁻¹ = UᵀU, and λ: [`DAMP`] times H's mean diagonal (up to
/// 1000 times more when that does not invert); None when it never does. With J the order
/// reversal, Cholesky of JHJ = L'L'ᵀ gives H = RRᵀ with R = JL'J upper triangular, so
/// H⁻¹ = R⁻ᵀR⁻¹ and U = R⁻¹ = J L'⁻¹ J.
pub(super) fn inverse_cholesky_upper(mut h: Array2<f64>) -> Option<(Array2<f64>, f64)> {
    let n = h.nrows();
    for i in 0..n {
        // An input that was zero on every calibration row: its weights round to nearest.
        if h[[i, i]] <= 0.0 {
            h[[i, i]] = 1.0;
        }
    }
    let mean = (0..n).map(|i| h[[i, i]]).sum::<f64>() / n.max(1) as f64;
    for attempt in 0..4 {
        let damp = DAMP * 10f64.powi(attempt) * mean;
        let mut a = Array2::<f64>::zeros((n, n));
        for i in 0..n {
            for j in 0..n {
                a[[i, j]] = h[[n - 1 - i, n - 1 - j]];
            }
            a[[i, i]] += damp;
        }
        if let Some(l) = cholesky(a) {
            let li = lower_inverse(&l);
            let mut u = Array2::<f64>::zeros((n, n));
            for i in 0..n {
                for j in i..n {
                    u[[i, j]] = li[[n - 1 - i, n - 1 - j]];
                }
            }
            return Some((u, damp));
        }
    }
    None
}

/// The lower-triangular Cholesky factor of a symmetric matrix (None when not positive definite).
fn cholesky(a: Array2<f64>) -> Option<Array2<f64>> {
    let n = a.nrows();
    let a = a.as_standard_layout();
    let a = a.as_slice().expect("standard layout");
    let mut l = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let dot: f64 = l[i * n..i * n + j]
                .iter()
                .zip(&l[j * n..j * n + j])
                .map(|(x, y)| x * y)
                .sum();
            let s = a[i * n + j] - dot;
            if i == j {
                if s <= 0.0 || !s.is_finite() {
                    return None;
                }
                l[i * n + i] = s.sqrt();
            } else {
                l[i * n + j] = s / l[j * n + j];
            }
        }
    }
    Array2::from_shape_vec((n, n), l).ok()
}

/// The inverse of a lower-triangular matrix with a positive diagonal, row by row:
/// X[i] = (e_i − Σ_{k<i} L[i][k]·X[k]) / L[i][i].
fn lower_inverse(l: &Array2<f64>) -> Array2<f64> {
    let n = l.nrows();
    let mut x = vec![0f64; n * n];
    for i in 0..n {
        let (done, rest) = x.split_at_mut(i * n);
        let row = &mut rest[..n];
        row[i] = 1.0;
        for k in 0..i {
            let f = l[[i, k]];
            if f != 0.0 {
                for (v, xk) in row[..=k].iter_mut().zip(&done[k * n..k * n + k + 1]) {
                    *v -= f * xk;
                }
            }
        }
        let d = l[[i, i]];
        for v in row[..=i].iter_mut() {
            *v /= d;
        }
    }
    Array2::from_shape_vec((n, n), x).expect("n x n values")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_cholesky_upper_factors_the_inverse() {
        let h = ndarray::arr2(&[[4.0, 1.0, 0.5], [1.0, 3.0, 0.2], [0.5, 0.2, 2.0]]);
        // No damping effect to speak of in the check: compare with the damped matrix.
        let mean = (4.0 + 3.0 + 2.0) / 3.0;
        let mut damped = h.clone();
        for i in 0..3 {
            damped[[i, i]] += DAMP * mean;
        }
        let (u, damp) = inverse_cholesky_upper(h).expect("positive definite");
        assert!((damp - DAMP * mean).abs() < 1e-12);
        for i in 0..3 {
            for j in 0..i {
                assert_eq!(u[[i, j]], 0.0, "upper triangular");
            }
            assert!(u[[i, i]] > 0.0);
        }
        let inv = u.t().dot(&u);
        let eye = inv.dot(&damped);
        for i in 0..3 {
            for j in 0..3 {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((eye[[i, j]] - want).abs() < 1e-9, "{eye:?}");
            }
        }
    }
}
