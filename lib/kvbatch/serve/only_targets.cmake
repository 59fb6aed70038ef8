# Given to llama.cpp's CMake as CMAKE_PROJECT_INCLUDE by kvbatch.serve.build: leave out of `all` every target but
# the programs kvbatch runs, so the build compiles llama-server and the few tools kvbatch uses instead of the ~40
# programs llama.cpp defines (tts, imatrix, perplexity, quantize, the mtmd command lines, the unified `llama` app)
# and the libraries only those use. A target left out of `all` is still built when a kept program needs it (CMake
# builds every dependency), so nothing a kept program links or depends on can be missed. KVBATCH_ONLY_TARGETS
# lists the kept programs; one that the source does not define stops the configure step with its name.
if(NOT CMAKE_CURRENT_SOURCE_DIR STREQUAL CMAKE_SOURCE_DIR)
  return()  # included after every project() call (ggml has its own): act once, for the top-level project
endif()
get_property(_kvbatch_deferred GLOBAL PROPERTY KVBATCH_ONLY_TARGETS_DEFERRED)
if(_kvbatch_deferred)
  return()
endif()
set_property(GLOBAL PROPERTY KVBATCH_ONLY_TARGETS_DEFERRED TRUE)

function(_kvbatch_targets_in dir out)
  get_property(_targets DIRECTORY "${dir}" PROPERTY BUILDSYSTEM_TARGETS)
  get_property(_subdirs DIRECTORY "${dir}" PROPERTY SUBDIRECTORIES)
  foreach(_sub IN LISTS _subdirs)
    _kvbatch_targets_in("${_sub}" _more)
    list(APPEND _targets ${_more})
  endforeach()
  set(${out} ${_targets} PARENT_SCOPE)
endfunction()

function(_kvbatch_only_targets)
  _kvbatch_targets_in("${CMAKE_SOURCE_DIR}" _all)
  foreach(_wanted IN LISTS KVBATCH_ONLY_TARGETS)
    if(NOT TARGET ${_wanted})
      message(FATAL_ERROR "kvbatch: this llama.cpp defines no program ${_wanted} (KVBATCH_ONLY_TARGETS)")
    endif()
  endforeach()
  set(_left_out "")
  foreach(_target IN LISTS _all)
    get_target_property(_type ${_target} TYPE)
    if(NOT _type STREQUAL "INTERFACE_LIBRARY" AND NOT _target IN_LIST KVBATCH_ONLY_TARGETS)
      set_target_properties(${_target} PROPERTIES EXCLUDE_FROM_ALL TRUE)
      list(APPEND _left_out ${_target})
    endif()
  endforeach()
  list(JOIN _left_out " " _left_out_text)
  message(STATUS "kvbatch: building ${KVBATCH_ONLY_TARGETS}; left out: ${_left_out_text}")
endfunction()

cmake_language(DEFER DIRECTORY "${CMAKE_SOURCE_DIR}" CALL _kvbatch_only_targets)
