"""The ADC reading of analog partial sums: a chip whose cells are not the ideal states
(`cim.variation`) gives real-valued partial sums, which a finite ADC rounds to its steps.

code(S) = min(max(rint(S / step), 0), top), the same arithmetic as `cim_bitserial.adc_code`
(which never meets a negative sum); S is the sum of the driven cells' conductances less the
off-current, plus the read noise, so it can fall below 0, which the ADC reads as code 0.
"""
import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def read_partial_sums(sums, variances, noise, read_noise, columns, step, top, codes):
    """codes[p, columns[k]] += sum_j 2^j code(S), S = sums[j, p, k] + read_noise
    sqrt(variances[j, p, k]) noise[j, p, k] (the noise terms only if `variances` is not
    empty), each column k's ADC step[columns[k]] and top code top[columns[k]]."""
    n_bits, n_positions, n_columns = sums.shape
    noisy = variances.shape[0] > 0
    for p in range(n_positions):
        for k in range(n_columns):
            column = columns[k]
            total = np.int64(0)
            for j in range(n_bits):
                partial_sum = np.float64(sums[j, p, k])
                if noisy:
                    partial_sum += read_noise * np.sqrt(np.float64(variances[j, p, k])) * \
                        noise[j, p, k]
                code = min(max(np.int64(np.rint(partial_sum / step[column])), 0), top[column])
                total += code << j
            codes[p, column] += total
