# The opt-in CUDA kernels (kernels/cuda/_ginjax_cuda.so: the ConvContract forward (D=3 and D=2) and weight
# gradient, the VectorNeuron forward and backward, the parity-blocked forward), included by CMakeLists.txt only with -DGINJAX_CUDA=ON. A plain shared
# library (no Python module): kernels/cuda/_ffi.py loads it with ctypes and registers its XLA FFI
# handlers for platform "CUDA".
# GINJAX_CUDA_INPLACE=ON writes it next to the sources (the standalone build in README.md).
include(CheckLanguage)
check_language(CUDA)
if(NOT CMAKE_CUDA_COMPILER)
  message(WARNING "ginjax-kernels: GINJAX_CUDA=ON but no CUDA compiler was found; not building the CUDA kernel")
  return()
endif()
enable_language(CUDA)
find_package(Python 3.11 COMPONENTS Interpreter QUIET)
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c "import jax.ffi; print(jax.ffi.include_dir())"
  OUTPUT_VARIABLE GINJAX_CUDA_FFI_INCLUDE OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE ginjax_cuda_ffi ERROR_QUIET)
if(NOT ginjax_cuda_ffi EQUAL 0 OR NOT EXISTS "${GINJAX_CUDA_FFI_INCLUDE}/xla/ffi/api/ffi.h")
  message(WARNING "ginjax-kernels: GINJAX_CUDA=ON but jax's FFI headers were not found; not building the CUDA kernel")
  return()
endif()
add_library(_ginjax_cuda MODULE ${CMAKE_CURRENT_LIST_DIR}/conv_contract.cu ${CMAKE_CURRENT_LIST_DIR}/conv_contract_d2.cu
            ${CMAKE_CURRENT_LIST_DIR}/weight_gradient.cu ${CMAKE_CURRENT_LIST_DIR}/weight_gradient_d2.cu
            ${CMAKE_CURRENT_LIST_DIR}/vector_neuron.cu ${CMAKE_CURRENT_LIST_DIR}/parity_conv.cu)
set_target_properties(_ginjax_cuda PROPERTIES PREFIX "" SUFFIX ".so" CUDA_ARCHITECTURES 90a
                      CUDA_STANDARD 17 CUDA_STANDARD_REQUIRED ON)
target_include_directories(_ginjax_cuda PRIVATE "${GINJAX_CUDA_FFI_INCLUDE}" ${CMAKE_CURRENT_LIST_DIR})
target_compile_options(_ginjax_cuda PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-O3 -Xptxas=-v>)
find_package(CUDAToolkit QUIET)
if(CUDAToolkit_FOUND)
  target_link_libraries(_ginjax_cuda PRIVATE CUDA::cudart_static)
endif()
if(GINJAX_CUDA_INPLACE)
  set_target_properties(_ginjax_cuda PROPERTIES LIBRARY_OUTPUT_DIRECTORY ${CMAKE_CURRENT_LIST_DIR})
endif()
install(TARGETS _ginjax_cuda LIBRARY DESTINATION kernels/cuda)
message(STATUS "ginjax-kernels: building the CUDA kernels (sm_90a) against ${GINJAX_CUDA_FFI_INCLUDE}")
